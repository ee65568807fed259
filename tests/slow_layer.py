"""A layer that makes every forward pass take a while, to show the server stays responsive."""

import time

from torch import nn

SECONDS = 3.0


class Sleep(nn.Module):
    def forward(self, x):
        time.sleep(SECONDS)
        return x
