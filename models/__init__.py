"""glassbox.models: the Llama-style decoder (dense and mixture-of-experts) that training, checkpoints, export,
inference and release all share. It sits below those areas, so none of them has to import another to get it."""
