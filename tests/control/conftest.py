"""The control tests run on one thread: the machine's cores are shared, and tiny MLPs gain nothing from more."""

import torch

torch.set_num_threads(1)
