"""tandem worker: holds the model, batches requests, streams tokens."""
