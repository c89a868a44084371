"""The trainer (PyTorch). Imports the core only.

    model        the MMoE ranker and its shallow tower, from named parts
    trainer      one pass over examples in time order: steps, checkpoints, exports
    progressive  progressive validation (each batch scored before it trains)
    propensity   examination propensities from randomised logging; IPW
    export       ONNX export into the model repository
    stream       reading the Redis training stream: consumer groups, pending entries, shard keys
    stream_worker  the continuous worker: train on the stream (one key or its shards, one process or torchrun)
    distributed  one model on several processes (torchrun): row shares, gradient reduction
"""
