"""Real datasets: the catalog of public sources, their on-disk layouts, and what parsing them yields."""
