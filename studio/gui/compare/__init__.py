"""The Compare tab in parts: the variants table, the plots, the A/B panel, and the view composing them."""
