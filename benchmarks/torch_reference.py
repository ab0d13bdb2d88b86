"""A PyTorch reference trainer: the public WE code's CIFAR recipe, without WE.

Plain PyTorch (no Keras in the training loop), for side-by-side runs with
keras-we's runner on the same machine:

- the CIFAR ResNets of He et al. with option-A shortcuts, as in the public
  code (`CifarResNet`), Kaiming-normal convolution and linear weights;
- `torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)` and
  `MultiStepLR` at the milestones of `keras_we.experiments.recipe.Recipe`
  (60, 120, 180 of 200 epochs, scaled to `--epochs`);
- torchvision's `RandomCrop(32, padding=4)` and `RandomHorizontalFlip()`,
  written here on whole batches (torchvision is not a dependency), then
  `ToTensor()` and `Normalize` with the package's CIFAR mean and std;
- the same training subset and test set as the runner
  (`keras_we.experiments.data.load_cifar`, which only reads the arrays).

The data lives on the device as uint8; crops, flips and normalization run
there too. Each epoch trains on a new permutation and evaluates the test
set (batches of 500, as the runner). The random streams are PyTorch's, so
a seed here is not paired with the same seed in keras-we: compare
distributions over seeds, not single runs.

    python benchmarks/torch_reference.py --seeds 0,1,2,3,4 --epochs 15 \\
        --train-size 10000 --test-size 5000 --out runs/torch_reference

prints one row per seed (final and best top-1, images/s) and, with
`--out`, writes `seed<k>.json` per run (finished runs are kept).
`benchmarks/throughput.py` times it against keras-we, and
`tests/test_torch_reference.py` checks that keras-we's `resnet20` with
`PaperSGD` takes the same steps as this model with `torch.optim.SGD`.

Two documented differences from Keras, neither of which changes training:
PyTorch's BatchNorm updates its running variance with the unbiased batch
variance (`n / (n - 1)` times Keras's biased one, `n` = batch x height x
width, e.g. 1 + 1.2e-4 for batch 128 at 8x8), which only changes the
statistics used at test time; and PyTorch draws a linear layer's bias like
its weights where keras-we starts it at zero (here it is zeroed, as in
keras-we).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

# keras_we is imported only for the data and the recipe's numbers; with
# the torch backend it loads no second framework.
os.environ.setdefault("KERAS_BACKEND", "torch")
from keras_we.experiments.data import CIFAR_MEAN, CIFAR_STD, load_cifar  # noqa: E402
from keras_we.experiments.recipe import Recipe  # noqa: E402


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, zero-pad the channels
    (the front gets the smaller half, as keras-we's `ZeroPadShortcut`)."""

    def __init__(self, channels, filters, stride):
        super().__init__()
        self.stride = stride
        self.front = (filters - channels) // 2
        self.back = filters - channels - self.front

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.front, self.back))


class BasicBlock(nn.Module):
    def __init__(self, channels, filters, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, filters, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters)
        self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(filters)
        if stride != 1 or channels != filters:
            self.shortcut = ZeroPadShortcut(channels, filters, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-`depth` for CIFAR (depth = 6n + 2), NCHW, returns logits."""

    def __init__(self, depth=20, classes=10):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"`depth` must be 6n + 2 with n >= 1. Received: depth={depth}")
        blocks = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        stages, channels = [], 16
        for filters, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(channels, filters, stride if i == 0 else 1))
                channels = filters
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.stages(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def keras_layer_pairs(torch_model):
    """(Keras layer name, torch module) of every layer with weights, for
    keras-we's `cifar_resnet` of the same depth."""
    pairs = [("stem_conv", torch_model.conv), ("stem_bn", torch_model.bn)]
    for s, stage in enumerate(torch_model.stages, start=1):
        for b, block in enumerate(stage, start=1):
            for k in (1, 2):
                prefix = f"stage{s}_block{b}_{k}"
                pairs.append((f"{prefix}_conv", getattr(block, f"conv{k}")))
                pairs.append((f"{prefix}_bn", getattr(block, f"bn{k}")))
    pairs.append(("predictions", torch_model.fc))
    return pairs


def torch_tensors(module):
    """The tensors of `module`, in the order of the Keras layer's
    `weights` (kernel first; BatchNorm: gamma, beta, mean, variance)."""
    if isinstance(module, nn.BatchNorm2d):
        return [module.weight, module.bias, module.running_mean, module.running_var]
    return [module.weight] + ([module.bias] if module.bias is not None else [])


def to_torch_layout(array, module):
    """A Keras weight as the corresponding torch tensor's layout."""
    if array.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:  # (in, out) -> (out, in)
        return array.T
    return array


def copy_from_keras(keras_model, torch_model):
    """Copies the weights of keras-we's `resnet<depth>` into `torch_model`."""
    with torch.no_grad():
        for name, module in keras_layer_pairs(torch_model):
            weights = keras_model.get_layer(name).get_weights()
            tensors = torch_tensors(module)
            if len(weights) != len(tensors):
                raise ValueError(f"Layer {name}: {len(weights)} Keras weights, {len(tensors)} in torch.")
            for tensor, array in zip(tensors, weights):
                tensor.copy_(torch.as_tensor(to_torch_layout(array, module).copy()))


def augment(images, generator, padding=4):
    """`RandomCrop(32, padding)` then `RandomHorizontalFlip()` on a uint8
    NHWC batch on any device, drawing offsets and flips from `generator`."""
    n, height, width, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).to(images.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    rows = offsets[:, :1] + torch.arange(height, device=images.device)
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def normalize(images):
    """uint8 NHWC -> normalized float32 NCHW (`ToTensor()` + `Normalize`)."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device)
    std = torch.tensor(CIFAR_STD, device=images.device)
    x = (images.float() / 255.0 - mean) / std
    return x.permute(0, 3, 1, 2).contiguous()


def evaluate(model, x_test, y_test, batch_size=500):
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x_test), batch_size):
            logits = model(normalize(x_test[start:start + batch_size]))
            correct += (logits.argmax(1) == y_test[start:start + batch_size]).sum().item()
    return correct / len(x_test)


def train(data, depth=20, epochs=15, seed=0, batch_size=128, device="cpu", log=None):
    """Trains one network; returns its record.

    Args:
        data: `(x_train, y_train), (x_test, y_test)` as from `load_cifar`.
        log: called with each epoch's dict, or None.

    Returns:
        dict: `test_accuracy`, `loss` and `learning_rate` per epoch, `final_test_accuracy`,
        `best_test_accuracy`, `epoch_seconds` (training plus evaluation)
        and `images_per_second` (training images over the median epoch's
        seconds, epoch 0 excluded when there are more).
    """
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classes = int(max(y_train.max(), y_test.max())) + 1
    model = CifarResNet(depth, classes).to(device)
    x_train = torch.as_tensor(x_train).to(device)
    y_train = torch.as_tensor(y_train.astype("int64")).to(device)
    x_test = torch.as_tensor(x_test).to(device)
    y_test = torch.as_tensor(y_test.astype("int64")).to(device)
    recipe = Recipe(epochs=epochs, batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.learning_rate, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, list(recipe.scaled_lr_milestones()), gamma=recipe.lr_factor)
    history, seconds = [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        total, count = 0.0, 0
        for first in range(0, len(order), batch_size):
            index = order[first:first + batch_size]
            x = normalize(augment(x_train[index], generator))
            loss = F.cross_entropy(model(x), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
            count += len(index)
        rate = optimizer.param_groups[0]["lr"]
        scheduler.step()
        accuracy = evaluate(model, x_test, y_test)
        seconds.append(time.perf_counter() - start)
        row = {"epoch": epoch, "loss": float(total) / count, "test_accuracy": accuracy,
               "learning_rate": rate, "seconds": seconds[-1]}
        history.append(row)
        if log:
            log(row)
    steady = seconds[1:] or seconds
    return {
        "depth": depth, "seed": seed, "epochs": epochs, "batch_size": batch_size,
        "train_size": len(x_train), "test_size": len(x_test), "device": str(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "test_accuracy": [row["test_accuracy"] for row in history],
        "loss": [row["loss"] for row in history],
        "learning_rate": [row["learning_rate"] for row in history],
        "final_test_accuracy": history[-1]["test_accuracy"],
        "best_test_accuracy": max(row["test_accuracy"] for row in history),
        "epoch_seconds": seconds,
        "images_per_second": len(x_train) / statistics.median(steady),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for seed<k>.json (finished runs are kept)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    data = load_cifar(args.dataset, data_dir=args.data_dir, train_size=args.train_size,
                      test_size=args.test_size)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"torch_reference: resnet{args.depth}, {args.dataset} train {len(data[0][0])} / test "
          f"{len(data[1][0])}, {args.epochs} epochs, batch {args.batch_size}, seeds {seeds}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    records = []
    for seed in seeds:
        path = args.out and os.path.join(args.out, f"seed{seed}.json")
        if path and os.path.exists(path):
            with open(path) as f:
                records.append(json.load(f))
            continue
        log = None if args.quiet else (lambda row: print(
            f"  seed {seed} epoch {row['epoch']}: loss {row['loss']:.4f} test {row['test_accuracy']:.4f}"
            f" ({row['seconds']:.1f} s)", flush=True))
        record = train(data, args.depth, args.epochs, seed, args.batch_size, args.device, log)
        records.append(record)
        if path:
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
    print("| seed | final top-1 | best top-1 | images/s |")
    print("|---|---|---|---|")
    for r in records:
        print(f"| {r['seed']} | {100 * r['final_test_accuracy']:.2f} | "
              f"{100 * r['best_test_accuracy']:.2f} | {r['images_per_second']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
