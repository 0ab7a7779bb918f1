"""The Inception-v3 network of FID, returning the 2048-d pool3 features.

FID (Heusel et al. 2017) is defined on the features of the TensorFlow Inception graph
`inception-2015-12-05`. The common PyTorch implementation, pytorch-fid (mseitzer/pytorch-fid), ports
those weights to the file

    pt_inception-2015-12-05-6726825d.pth
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

and loads it into torchvision's Inception3 (1008 output classes, no auxiliary head) with four kinds of
blocks patched to match the TensorFlow graph. This module builds that same network:

- Mixed_5b/5c/5d (`FIDInceptionA`), Mixed_6b..6e (`FIDInceptionC`), Mixed_7b (`FIDInceptionE`, "avg"): the
  branch pool is a 3x3 average pool that ignores the zero padding (count_include_pad=False), as TensorFlow's.
- Mixed_7c (`FIDInceptionE`, "max"): the branch pool is a 3x3 *max* pool.
- Everything else is torchvision's block, under torchvision's parameter names, so the file loads strictly.

The file is not downloaded by this project (no side effects, no network): fetch it once from the address
above and pass it with `--inception-weights PATH`. torchvision's own ImageNet Inception weights are a
different network (1000 classes, auxiliary head, other weights) and are refused: FID numbers from them
are not comparable with published ones. No checksum is checked here (none is recorded in this project);
the structural check in `load_fid_inception` refuses any file whose tensors do not fit this network.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from tqdm import tqdm

from ldm.errors import UserError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FEATURE_DIM = 2048
INPUT_SIZE = 299


def _tf_avg_pool(x):
    """3x3 stride-1 average pool that, like TensorFlow's, averages over the unpadded pixels only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """torchvision's InceptionA with TensorFlow's average pool in the pool branch. (B, Cin, H, W) -> (B, 224 + pool_features, H, W)."""

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(InceptionC):
    """torchvision's InceptionC with TensorFlow's average pool in the pool branch. (B, 768, 17, 17) -> (B, 768, 17, 17)."""

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class FIDInceptionE(InceptionE):
    """torchvision's InceptionE with the pool branch of the TensorFlow FID graph. (B, Cin, 8, 8) -> (B, 2048, 8, 8).

    pool="avg" (Mixed_7b): average pool, padding not counted. pool="max" (Mixed_7c): a 3x3 max pool where
    torchvision averages.
    """

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be avg or max, got {pool!r}")
        self.pool = pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as used for FID. x: (B, 3, 299, 299) in [-1, 1] -> pool3 features (B, 2048).

    Parameter names and shapes equal those of torchvision's `Inception3(num_classes=1008, aux_logits=False)`.
    `fc` (2048 -> 1008) is unused by `forward`; it is kept so that the weights file loads strictly.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... -> (B, 768, 17, 17) -> (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048) pool3


def load_fid_inception(path):
    """The FID Inception network with the weights file at `path`, loaded strictly, in eval mode.

    Any missing, unexpected or mis-shaped tensor is a UserError naming the file and the first such keys.
    The only tolerance: BatchNorm's `num_batches_tracked` counters, absent from files written by old
    PyTorch versions and unused in eval mode, are set to 0 when missing (what PyTorch itself does for such files).
    """
    if not os.path.isfile(path):
        raise UserError(f"--inception-weights {path} does not exist; download {FID_WEIGHTS_URL}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign or truncated file must be one clear message
        raise UserError(f"--inception-weights {path} is not a PyTorch state dict ({type(e).__name__}); "
                        f"expected {FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--inception-weights {path} is not a state dict of tensors; expected {FID_WEIGHTS_NAME}")
    net = FIDInceptionV3()
    expected = net.state_dict()
    state = dict(state)
    for key in expected:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UserError(f"--inception-weights {path} does not match the FID Inception network ({'; '.join(problems[:3])}"
                        f"{more}); expected pytorch-fid's {FID_WEIGHTS_NAME} (torchvision's ImageNet weights do not fit)")
    net.load_state_dict(state, strict=True)
    return net.eval()


def fid_input(x):
    """uint8 images (B, C, H, W), C in {1, 3} -> (B, 3, 299, 299) float in [-1, 1], as pytorch-fid prepares them.

    Scaled to [0, 1] (as torchvision's ToTensor does for a PNG), grayscale repeated to 3 channels (as PIL's
    convert("RGB")), resized bilinearly (align_corners=False, no antialiasing), then mapped to [-1, 1].
    """
    x = x.float().div(255.0)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


@torch.no_grad()
def fid_feature_batches(net, x, batch=50, desc="inception features"):
    """pool3 features of uint8 images `x: (N, C, H, W)`, yielded per batch as (B, 2048) float32 CPU tensors."""
    net.eval()
    device = next(net.parameters()).device
    for i in tqdm(range(0, len(x), batch), desc=desc, unit="batch", leave=False):
        yield net(fid_input(x[i:i + batch].to(device))).float().cpu()
