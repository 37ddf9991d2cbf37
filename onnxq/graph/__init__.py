"""Graph layer: loading and saving models, preparation, placement and QDQ rewriting."""
