"""PyTorch side of each op: launchers, custom ops (torch.ops.softmax_gpu.*), autograd, functional API.

One module per op: softmax.py (softmax, log_softmax, hardmax) and cross_entropy.py.
"""
