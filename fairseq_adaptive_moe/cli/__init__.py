"""Console scripts of this plugin."""
