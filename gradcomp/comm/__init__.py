"""Communication: collectives and transports, plan cache, error-feedback memory, the DDP hook, Horovod and FSDP2."""
