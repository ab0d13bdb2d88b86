"""Which layers Weight Evolution evolves, and which of their variables.

The registry maps a layer class to a function `layer -> [(variable,
layout), ...]`, the layer's evolvable variables with their `Layout`. A
layer matches the first registered class it is an instance of, most
specific first (its class, then its bases in method-resolution order), so a
subclass of `Conv2D` is evolved as a `Conv2D` unless registered itself.

To evolve a layer of your own (or one Keras has that Weight Evolution
leaves alone), register it; see ARCHITECTURE.md for a worked example:

```python
keras_we.register_layer(MyConv, lambda layer: [(layer.kernel, keras_we.layouts.REGULAR_KERNEL)])
```
"""

import dataclasses

import keras

from keras_we import layouts

_REGISTRY = {}


def register_layer(layer_class, evolvable):
    """Registers `evolvable(layer) -> [(variable, layout), ...]` for
    instances of `layer_class`, replacing any earlier registration of that
    class. `evolvable` may return `None` for a variable the layer does not
    have (e.g. a BatchNorm without `scale`); it is left out."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"`layer_class` must be a keras.layers.Layer subclass; got {layer_class!r}.")
    if not callable(evolvable):
        raise TypeError(f"`evolvable` must be a callable layer -> [(variable, layout)]; got {evolvable!r}.")
    _REGISTRY[layer_class] = evolvable


def unregister_layer(layer_class):
    """Removes the registration of `layer_class` (not of its bases)."""
    _REGISTRY.pop(layer_class, None)


def evolvable_of(layer):
    """The registered function for `layer`'s class, or None."""
    for cls in type(layer).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


@dataclasses.dataclass(frozen=True)
class Target:
    """One variable Weight Evolution rewrites, and how it holds its items."""

    variable: object
    layout: layouts.Layout

    @property
    def path(self):
        return self.variable.path

    @property
    def group(self):
        return self.layout.group


def find_targets(model):
    """The trainable evolvable variables of `model`, in traversal order.

    Layers are visited depth-first in the order they were tracked, nested
    models and layers included. Variables that do not train (a layer or
    model set `trainable = False`, a LoRA layer's frozen base kernel, a
    variable made with `trainable=False`) are left out: they are neither
    ranked nor rewritten. Raises `ValueError` for an unbuilt layer.
    """
    targets = []
    for layer in walk_layers(model):
        evolvable = evolvable_of(layer)
        if evolvable is None:
            continue
        if not layer.built:
            raise ValueError(
                f"Layer {layer.name!r} is not built, so Weight Evolution cannot "
                "read its weights. Build the model first (call it on data, "
                "`model.build(input_shape)`, or give it an `Input`)."
            )
        targets += [Target(v, layout) for v, layout in evolvable(layer) if v is not None]
    trainable = {id(variable) for variable in model.trainable_variables}
    return [target for target in targets if id(target.variable) in trainable]


def walk_layers(model):
    """`model` and all its layers, nested ones included, depth-first in
    the order they were tracked, each once."""
    return [model, *_walk(model)]


def _walk(layer, seen=None):
    seen = set() if seen is None else seen
    for sublayer in layer._layers:
        if id(sublayer) in seen:
            continue
        seen.add(id(sublayer))
        yield sublayer
        yield from _walk(sublayer, seen)


# ------------------------------------------------------ Keras's own layers


def _conv(layer):
    # A LoRA-enabled layer's `kernel` is a computed tensor; the variable
    # behind it is `_kernel` (left out anyway while LoRA freezes it).
    return [(layer._kernel, layouts.REGULAR_KERNEL)]


def _depthwise(layer):
    return [(layer.kernel, layouts.DEPTHWISE_KERNEL)]


def _separable(layer):
    # Two kernels, counted as two in `K`: depthwise first, as it runs first.
    return [(layer.depthwise_kernel, layouts.DEPTHWISE_KERNEL),
            (layer.pointwise_kernel, layouts.REGULAR_KERNEL)]


def _batch_norm(layer):
    return [(layer.gamma if layer.scale else None, layouts.GAMMA),
            (layer.beta if layer.center else None, layouts.BETA)]


for _class in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D):
    register_layer(_class, _conv)
for _class in (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D):
    register_layer(_class, _depthwise)
for _class in (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D):
    register_layer(_class, _separable)
register_layer(keras.layers.BatchNormalization, _batch_norm)


# ------------------------------------------------------ conv -> BatchNorm


def batch_norm_after(model):
    """The BatchNormalization layer that normalizes each conv layer's output.

    Returns `{conv layer: BatchNormalization layer}` for the built layers
    with a registered conv kernel (trainable or not; BatchNorm layers
    themselves left out) whose output a BatchNorm normalizes; a conv layer
    with no such BatchNorm is not in the dict. Each BatchNorm belongs to at
    most one conv layer, and its channel count (the length of its moving
    mean) equals the conv layer's output channels.

    - A conv layer in a functional graph (a functional or `Sequential`
      model, nested ones included: the layer has inbound nodes) takes the
      BatchNorm whose input is the conv's output tensor (its
      `_keras_history`), and none if no BatchNorm reads it directly (a
      pre-activation block, where the BatchNorm comes before the conv).
    - A conv layer in no graph (inside a subclassed model or layer) takes
      the next BatchNorm in traversal order (`walk_layers`, the order the
      layers were tracked) before the next conv layer, if its channel
      count matches and no other conv layer took it.
    """
    layers = [layer for layer in walk_layers(model) if layer.built]
    convs = {id(layer): layer for layer in layers if _conv_channels(layer)}
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    found, taken = {}, set()

    def pair(conv, norm):
        if (conv not in found and id(norm) not in taken
                and _conv_channels(conv) == norm.moving_mean.shape[-1]):
            found[conv] = norm
            taken.add(id(norm))

    for norm in norms:
        for node in getattr(norm, "_inbound_nodes", []):
            for tensor in node.input_tensors:
                history = getattr(tensor, "_keras_history", None)
                producer = getattr(history, "operation", None)
                if producer is not None and id(producer) in convs:
                    pair(producer, norm)

    for i, layer in enumerate(layers):
        if id(layer) not in convs or getattr(layer, "_inbound_nodes", None):
            continue
        for later in layers[i + 1:]:
            if id(later) in convs:
                break
            if isinstance(later, keras.layers.BatchNormalization) and id(later) not in taken:
                pair(layer, later)
                break
    return found


def _conv_channels(layer):
    """The output channels of a layer with a registered conv kernel (the
    items of its last kernel), else 0."""
    evolvable = evolvable_of(layer)
    if evolvable is None or not layer.built:
        return 0
    kernels = [(v, layout) for v, layout in evolvable(layer) if v is not None and layout.is_kernel]
    if not kernels:
        return 0
    variable, layout = kernels[-1]
    return layout.items(tuple(variable.shape))
