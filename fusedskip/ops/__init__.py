"""One module per op: reference path, torch.library ops, autograd Function, functional and module."""
