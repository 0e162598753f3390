"""Plumbing beneath every layer: `cli` (flags, env vars, logging, one-line errors), `safeio` (atomic writes, the
restricted unpickler), `alloc` (glibc allocator settings), `device` (device choice, memory figures), `dist`
(torch.distributed: the only module that calls it). Imports nothing else of ours."""
