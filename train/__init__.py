"""glassbox.train: the Llama-style dense and MoE model, parallelism applied from outside (DDP, FSDP2, tensor
parallel), and the training loop launched by `glassbox train` or `torchrun -m glassbox.train`."""
