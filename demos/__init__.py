"""Interactive views of poslens results: a local Dash app, a static HTML page and notebooks."""
