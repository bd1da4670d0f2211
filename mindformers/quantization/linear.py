"""Weight-only int8 layers: a Linear, a tied output head and an Embedding whose weights are int8 with a scale per
32-weight block (`block32`, llama.cpp's Q8_0) or per output row (`channel`); activations stay float.

Each is made from the float layer in place (`adopt`: the same object keeps its place in the model and its parameter
names), holding `weight` int8 [out, in] (an Embedding: [vocab, hidden]) and `weight_scale` (block32: fp16
[out, in // 32]; channel: fp32 [out]) as `mindformers.quantization.formats.quantize` gives them, plus the float
`bias` it had. The int8 parameters do not train."""
import mindspore as ms
from mindspore import Parameter, Tensor, ops
from mindspore.common.initializer import initializer
from mindspore.nn.utils import no_init_parameters

from mindformers.kernels import use_fused
from mindformers.modules.layers import Embedding, Linear

BLOCK = 32


def scale_shape(scheme, rows, columns):
    """The shape of `weight_scale` for an int8 weight [rows, columns] under `scheme`."""
    return [rows, columns // BLOCK] if scheme == 'block32' else [rows]


def _scale_dtype(scheme):
    return ms.float16 if scheme == 'block32' else ms.float32


def _int8_kernel(scheme, compute_dtype):
    """The int8 matrix kernel cell for `scheme` (`kernels.FusedInt8Linear`) when the fused CPU kernels run here (fp32,
    see `kernels.use_fused`), else None: the layer then widens its weight with MindSpore ops."""
    try:
        from mindformers.kernels import FusedInt8Linear
    except ImportError:  # a kernel library without the int8 kernels
        return None
    return FusedInt8Linear(scheme) if use_fused(compute_dtype) else None


def _set_int8(cell, weight, scale, scheme):
    """Give `cell` (a Linear or Embedding) int8 `weight` and its `scale` (NumPy arrays), or zero placeholders that a
    checkpoint fills when they are None, under the float weight's name; the float weight is dropped."""
    rows, columns = cell.weight.shape
    if scheme == 'block32' and columns % BLOCK:
        raise ValueError(f"{cell.weight.name} [{rows}, {columns}]: block32 needs the input size divisible by "
                         f"{BLOCK}; quantize with scheme 'channel'")
    prefix = cell.weight.name[:-len('weight')]
    cell.weight_dtype = cell.weight.dtype  # what the float layer held, for a float view of the weights
    for name, value, shape, dtype in (('weight', weight, [rows, columns], ms.int8),
                                      ('weight_scale', scale, scale_shape(scheme, rows, columns),
                                       _scale_dtype(scheme))):
        data = initializer('zeros', shape, dtype) if value is None else Tensor(value)
        if tuple(data.shape) != tuple(shape) or data.dtype != dtype:
            raise ValueError(f"{prefix}{name}: expected {dtype} {shape}, got {data.dtype} {list(data.shape)}")
        param = Parameter(data, name=name, requires_grad=False)
        setattr(cell, name, param)
        param.name = prefix + name
    cell.scheme = scheme


def _widen(q, scale, scheme, dtype):
    """int8 rows `q` [..., K] times their scales (block32 [..., K // 32], channel [...]) in `dtype`."""
    values = ops.cast(q, dtype)
    if scheme == 'channel':
        return values * ops.cast(scale, dtype).expand_dims(-1)
    shape = q.shape
    blocks = values.reshape(shape[:-1] + (shape[-1] // BLOCK, BLOCK))
    return (blocks * ops.cast(scale, dtype).expand_dims(-1)).reshape(shape)


class Int8Linear(Linear):
    """y = x @ (weight * scale).T + bias (+ residual) with an int8 `weight` [out, in] and its `weight_scale`; Linear's
    `construct(x [..., in], add_bias=True, residual=None) -> [..., out]` in `compute_dtype`. With the int8 kernels
    (fp32 on CPU) the weights are widened in registers; otherwise with MindSpore ops (block32: the weight is widened
    whole, then multiplied; channel: the product of the int8 weight is scaled per output). `bias_fusable` is False:
    callers leave the bias to it. `few_rows_limit`: the rows up to which the int8 kernel's few-rows path runs
    (`int8.cc` kFewRows), giving each row the same bits whatever rows are beside it."""

    few_rows_limit = 16

    @classmethod
    def adopt(cls, linear, weight=None, scale=None, scheme='block32'):
        """Turn the plain Linear `linear` into `cls` in place, holding `weight` int8 [out, in] and `scale` (as
        `formats.quantize(…, scheme)` returns them), or placeholders for a checkpoint when they are None."""
        if type(linear) is not Linear:
            raise TypeError(f"{cls.__name__} adapts a plain Linear, got {type(linear).__name__} "
                            f"({linear.weight.name})")
        _set_int8(linear, weight, scale, scheme)
        linear.__class__ = cls
        linear.bias_fusable = False
        linear.few_rows = linear.few_rows_residual = linear.bias_residual = None
        linear.int8_kernel = _int8_kernel(scheme, linear.compute_dtype)
        return linear

    def float_weight(self):
        """weight * scale as float [out, in] (in the layer's compute dtype)."""
        return _widen(self.weight, self.weight_scale, self.scheme, self.compute_dtype)

    def construct(self, x, add_bias=True, residual=None):
        shape = x.shape
        if len(shape) != 2:
            x = x.reshape(-1, shape[-1])
        if x.dtype != self.compute_dtype:
            x = ops.cast(x, self.compute_dtype)
        if self.int8_kernel is not None:
            y = self.int8_kernel(x, self.weight, self.weight_scale)
        elif self.scheme == 'channel':
            y = self.matmul(x, ops.cast(self.weight, self.compute_dtype)) * ops.cast(self.weight_scale,
                                                                                     self.compute_dtype)
        else:
            y = self.matmul(x, self.float_weight())
        if self.has_bias and add_bias:
            bias = self.bias
            if bias.dtype != self.compute_dtype:
                bias = ops.cast(bias, self.compute_dtype)
            y = self.bias_add(y, bias)
        if residual is not None:
            y = self.residual_add(residual.reshape(-1, self.out_features), y)
        if len(shape) != 2:
            y = y.reshape(shape[:-1] + (self.out_features,))
        return y


class Int8TiedLMHead(Int8Linear):
    """The int8 output head of a model whose head is tied to its token embedding: it holds its own int8 copy of the
    table (`weight` [vocab, hidden], `weight_scale`), so the embedding may stay float. `construct(hidden [N, H],
    table)` -> fp32 logits [N, vocab], as `TiedLMHead`'s; `table` (what the model passes) is not read."""

    @classmethod
    def for_table(cls, table, weight=None, scale=None, scheme='block32', compute_dtype='float32'):
        """A head for the float `table` Parameter [vocab, hidden], named `lm_head.*` until its owner renames it."""
        vocab, hidden = table.shape
        with no_init_parameters():  # its float weight is replaced at once: never allocate it
            head = Linear(hidden, vocab, has_bias=False, compute_dtype=compute_dtype)
        head.weight.name = 'lm_head.weight'
        return cls.adopt(head, weight, scale, scheme)

    def construct(self, hidden, table=None):
        logits = Int8Linear.construct(self, hidden)
        return logits if logits.dtype == ms.float32 else ops.cast(logits, ms.float32)


class Int8Embedding(Embedding):
    """A lookup table held in int8 (`weight` [vocab, hidden], `weight_scale`): ids [...] int32 -> [..., hidden] in
    the float dtype the table had, each row widened after the lookup."""

    @classmethod
    def adopt(cls, embedding, weight=None, scale=None, scheme='block32'):
        """Turn the Embedding `embedding` into `cls` in place (as `Int8Linear.adopt`)."""
        if type(embedding) is not Embedding:
            raise TypeError(f"{cls.__name__} adapts an Embedding, got {type(embedding).__name__} "
                            f"({embedding.weight.name})")
        _set_int8(embedding, weight, scale, scheme)
        embedding.__class__ = cls
        return embedding

    def float_weight(self):
        """The table as float [vocab, hidden] (the dtype it had)."""
        return _widen(self.weight, self.weight_scale, self.scheme, self.weight_dtype)

    def construct(self, input_ids):
        rows = self.gather(self.weight, input_ids, 0)
        scales = self.gather(self.weight_scale, input_ids, 0)
        return _widen(rows, scales, self.scheme, self.weight_dtype)
