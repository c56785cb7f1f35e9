"""Single-cell front end: AnnData in, Nicheformer model, tokenization, batching."""
