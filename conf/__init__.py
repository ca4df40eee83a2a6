"""The configs, importable as ``reddino.conf`` (src/reddino/conf links here) so that Hydra finds them
through ``pkg://reddino.conf`` in a checkout and in an installed wheel alike."""
