import torch

# The tests build tiny models; on 2 shared cores extra intra-op threads cost more than they save.
torch.set_num_threads(1)
