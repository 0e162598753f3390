"""Our own packages beside the competition's (`dataset`, `rqvae`, `evalu`):

- `genrec.core`: the plumbing every layer shares (CLI, logging, allocator, safe I/O, devices, torch.distributed);
  it imports nothing else of ours.
- `genrec.recommender`: the sequential recommender, its trainer and its checkpoint format.

Nothing is imported here, so `import genrec.core` stays light.
"""
