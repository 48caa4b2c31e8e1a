"""Pure measures: a model and tokens (or captured activations) in, tidy tables out."""
