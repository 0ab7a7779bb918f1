"""Downstream classifiers for the synthetic-data accuracy protocol, and the digit feature network.

The protocol (DPDM: Dockhorn et al. 2023, "Differentially Private Diffusion Models"): train a classifier only
on synthetic labelled images, choose the epoch by accuracy on held-out *synthetic* images, then measure
accuracy on the real test set once. `train_and_select` does the first two steps and never sees real data;
`accuracy` does the last; `downstream_accuracy` runs the three for each named classifier.

Every model takes images `x: (B, C, H, W)` in [-1, 1] at the evaluation size and returns logits
`(B, K)`. The data functions take uint8 images `(N, C, H, W)` (as in `ldm.data.ImageSet`) and convert
each batch with `to_unit_range`, so that a 60k set is never held in float.
"""

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ldm.data import to_unit_range

CLASSIFIERS = ("cnn", "mlp", "logreg")
PROTOCOL = ("classifiers trained only on the synthetic training split; epoch chosen by accuracy on the held-out "
            "synthetic validation split; the real test set is used once per classifier, after selection (DPDM protocol)")


class SmallCNN(nn.Module):
    """Two 3x3 conv layers, each followed by ReLU and 2x2 max-pooling, then FC(hidden) + dropout + FC(K).

    x: (B, C, H, W) -> (B, 16, H/2, W/2) -> (B, 32, H/4, W/4) -> features (B, hidden) -> logits (B, K).
    `features` is the penultimate layer, used for the digit-classifier Frechet distance. The widths are
    small so that an epoch of 50k 32x32 images takes about 20 s on one CPU core.
    """

    def __init__(self, channels, size, num_classes, hidden=128, dropout=0.5):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def features(self, x):
        return self.fc(self.conv(x))  # (B, hidden)

    def forward(self, x):
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten -> FC(512) -> ReLU -> dropout -> FC(256) -> ReLU -> FC(K). x: (B, C, H, W) -> (B, K)."""

    def __init__(self, channels, size, num_classes, dropout=0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * size * size, 512), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on raw pixels: one linear layer. x: (B, C, H, W) -> (B, K)."""

    def __init__(self, channels, size, num_classes):
        super().__init__()
        self.linear = nn.Linear(channels * size * size, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


_BUILDERS = {"cnn": SmallCNN, "mlp": MLP, "logreg": LogisticRegression}


@contextlib.contextmanager
def seeded(seed, device=torch.device("cpu")):
    """Seed torch's global generators (initialisation, dropout) inside the block only.

    Layers and dropout draw from the global generator and take no `torch.Generator`; forking it keeps
    the caller's random stream untouched and makes the block a function of `seed`.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def build_classifier(name, channels, size, num_classes, seed):
    """A freshly initialised classifier `name` (cnn, mlp or logreg); initialisation depends only on `seed`."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown classifier {name!r}; valid: {', '.join(CLASSIFIERS)}")
    with seeded(seed):
        return _BUILDERS[name](channels, size, num_classes)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def accuracy(model, x, y, batch=1000):
    """Fraction of `x: (N, C, H, W) uint8` classified as `y: (N,)`, in eval mode (no dropout)."""
    model.eval()
    device = _device(model)
    correct = 0
    for i in range(0, len(x), batch):
        pred = model(to_unit_range(x[i:i + batch]).to(device)).argmax(1)
        correct += (pred.cpu() == y[i:i + batch]).sum().item()
    return correct / len(x)


def train_epoch(model, opt, x, y, batch, gen, desc):
    """One pass of cross-entropy training over `x, y` in an order drawn from `gen`; returns the running accuracy."""
    model.train()
    device = _device(model)
    order = torch.randperm(len(x), generator=gen)
    correct = 0
    for i in tqdm(range(0, len(x), batch), desc=desc, unit="batch", leave=False):
        idx = order[i:i + batch]
        xb, yb = to_unit_range(x[idx]).to(device), y[idx].to(device)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct += (logits.argmax(1) == yb).sum().item()
    return correct / len(x)


@dataclass(frozen=True)
class Selection:
    epoch: int  # 1-based epoch whose weights were kept
    val_accuracy: float  # accuracy of those weights on the synthetic validation split
    val_history: tuple  # validation accuracy after each epoch


def train_and_select(model, train_x, train_y, val_x, val_y, epochs, batch, lr, seed, desc="classifier"):
    """Train with Adam for `epochs` epochs, keep the weights of the epoch with the best validation accuracy.

    train_x, val_x: (N, C, H, W) uint8 *synthetic* images; train_y, val_y: (N,) int64. The real test set is
    not an argument: model selection cannot see it. Ties keep the earlier epoch. Deterministic given
    `seed` on CPU (data order, dropout). Returns (model with the chosen weights loaded, Selection).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best_acc, best_epoch, best_state, history = -1.0, 0, None, []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch")
    with seeded(seed, _device(model)):
        for epoch in bar:
            train_acc = train_epoch(model, opt, train_x, train_y, batch, gen, f"{desc} epoch {epoch}")
            val_acc = accuracy(model, val_x, val_y)
            history.append(val_acc)
            bar.set_postfix(train=f"{train_acc:.4f}", val_synthetic=f"{val_acc:.4f}")
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state, strict=True)
    return model, Selection(best_epoch, best_acc, tuple(history))


def downstream_accuracy(names, train, val, test, epochs, batch, lr, seed, device):
    """{name: {test_accuracy, val_accuracy_synthetic, epoch, ...}}: select on `val` (synthetic), then test once.

    train, val: (x (N, C, H, W) uint8, y (N,) int64) synthetic splits; test: the real test `ImageSet`, used by
    exactly one `accuracy` call per classifier, after its epoch was chosen.
    """
    results = {}
    c, s = test.x.shape[1], test.x.shape[-1]
    for name in names:
        start = time.time()
        model = build_classifier(name, c, s, test.num_classes, seed).to(device)
        model, sel = train_and_select(model, *train, *val, epochs, batch, lr, seed, desc=name)
        test_acc = accuracy(model, test.x, test.y)  # the only use of the real test set
        results[name] = {"test_accuracy": test_acc, "val_accuracy_synthetic": sel.val_accuracy, "epoch": sel.epoch,
                         "epochs_trained": epochs, "val_history_synthetic": list(sel.val_history),
                         "seconds": round(time.time() - start, 1)}
    return results


@dataclass(frozen=True)
class FeatureRecipe:
    """How the digit feature network is trained; stored with its cache so a changed recipe retrains it."""
    epochs: int = 2
    batch: int = 128
    lr: float = 1e-3
    seed: int = 0


def train_feature_cnn(x, y, num_classes, recipe, device):
    """A `SmallCNN` trained on real training images `x: (N, C, H, W) uint8`, `y: (N,)`, no model selection.

    Returns (model in eval mode, running training accuracy of the last epoch).
    """
    model = build_classifier("cnn", x.shape[1], x.shape[-1], num_classes, recipe.seed).to(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    train_acc = 0.0
    with seeded(recipe.seed, device):
        for epoch in tqdm(range(1, recipe.epochs + 1), desc="feature cnn (real train)", unit="epoch"):
            train_acc = train_epoch(model, opt, x, y, recipe.batch, gen, f"feature cnn epoch {epoch}")
    return model.eval(), train_acc
