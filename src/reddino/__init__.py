"""reddino."""
