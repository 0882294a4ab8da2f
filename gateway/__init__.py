"""tandem gateway: the HTTP side."""
