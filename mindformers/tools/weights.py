"""Weights read one tensor at a time, and written as (sharded) safetensors sets.

`open_weights(path)` -> a `WeightSource`: a read-only mapping name -> np.ndarray whose values are read on access.
    .names() -> list[str]; .shape(name) -> tuple; .dtype(name) -> str (the stored dtype: 'float32', 'float16',
    'bfloat16', 'int8', ...); .read(name) -> np.ndarray (bfloat16 widened to float32; NumPy has no bfloat16).
  `path`: a `.safetensors` file (memory-mapped: a tensor is paged in when read, nothing else is held), a sharded set
  (`*.index.json` in HuggingFace's format: {"metadata": {"total_size": N}, "weight_map": {name: shard file}}; the
  shards are opened lazily, each memory-mapped), a `.bin`/`.pt`/`.pth` PyTorch file (`torch.load(weights_only=True,
  mmap=True)`: memory-mapped too, except files in PyTorch's legacy format, read whole), a MindSpore `.ckpt` (read
  whole: its format cannot be read in parts), or a directory holding one of these (an index first).
`load_weights(model, items, source, transform=None)` sets each Parameter from its array as it arrives (cast to the
  parameter's dtype), so a model loads while holding one tensor beside its parameters.
`write_safetensors` / `save_sharded` write HuggingFace-compatible files one tensor at a time, atomically."""
import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping

import numpy as np

from mindformers.tools.checkpoint import CheckpointError, listing, resolve_checkpoint
from mindformers.tools.file_io import first_line, fsync_path, write_json_atomic

# safetensors dtype codes <-> NumPy dtype names ('bfloat16' is stored as its 16 bits)
_ST_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'I64': 'int64',
              'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8', 'BOOL': 'bool'}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {'bfloat16': 2}
INDEX_SUFFIX = '.index.json'
HF_WEIGHT_FILES = ('model.safetensors.index.json', 'model.safetensors', 'pytorch_model.bin.index.json',
                   'pytorch_model.bin')


class CorruptWeightsError(CheckpointError):
    """A weight file that cannot be read (truncated, corrupt); `.path` and `.detail` say which and why."""

    def __init__(self, path, detail, kind='weight file', advice='download or save it again'):
        self.path, self.detail = path, detail
        super().__init__(f"{kind} {path} is truncated or corrupt ({detail}); {advice}")


def itemsize(dtype):
    return _ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize


def bf16_to_fp32(bits):
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16(values):
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (exact for values that are bfloat16)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


class WeightSource(Mapping):
    """Tensors read one at a time (see the module docstring). Subclasses implement `names`, `shape`, `dtype`,
    `_read` (the stored array; bfloat16 as uint16 bits)."""

    path = '<weights>'

    def names(self):
        raise NotImplementedError

    def shape(self, name):
        raise NotImplementedError

    def dtype(self, name):
        raise NotImplementedError

    def _read(self, name):
        raise NotImplementedError

    def read(self, name):
        """The tensor `name` as a NumPy array (bfloat16 widened to float32). Treat it as read-only: some sources
        return views of what they hold."""
        if name not in self._name_set():
            raise KeyError(f"{self.path} has no tensor {name!r}")
        value = self._read(name)
        return bf16_to_fp32(value) if self.dtype(name) == 'bfloat16' else value

    def nbytes(self, name):
        return math.prod(self.shape(name)) * itemsize(self.dtype(name))

    def shapes(self):
        """name -> shape of every tensor (no data read)."""
        return {name: tuple(self.shape(name)) for name in self.names()}

    def _name_set(self):
        if getattr(self, '_names_cache', None) is None:
            self._names_cache = frozenset(self.names())
        return self._names_cache

    # Mapping: values are read on access
    def __getitem__(self, name):
        return self.read(name)

    def __contains__(self, name):
        return name in self._name_set()

    def __iter__(self):
        return iter(self.names())

    def __len__(self):
        return len(self.names())

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, {len(self)} tensors)"


class DictSource(WeightSource):
    """An in-memory mapping name -> array (or anything with `.shape`, `.dtype` and `np.asarray`) as a source."""

    def __init__(self, tensors, path='<weights>'):
        self.tensors, self.path = tensors, path

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        value = self.tensors[name]
        dtype = getattr(value, 'dtype', None)
        return str(dtype).lower().replace('mindspore.', '') if not isinstance(dtype, np.dtype) else dtype.name

    def _read(self, name):
        value = self.tensors[name]
        if hasattr(value, 'asnumpy'):  # a MindSpore tensor
            import mindspore as ms
            return (value.astype(ms.float32) if value.dtype == ms.bfloat16 else value).asnumpy()
        return np.asarray(value)

    def read(self, name):
        return self._read(name)


class TensorView(WeightSource):
    """Another source's tensors under other names: `names` maps each name of the view to one of `base`'s (several
    may map to the same one)."""

    def __init__(self, base, names):
        self.base, self.mapping, self.path = base, dict(names), base.path

    def names(self):
        return list(self.mapping)

    def shape(self, name):
        return self.base.shape(self.mapping[name])

    def dtype(self, name):
        return self.base.dtype(self.mapping[name])

    def read(self, name):
        return self.base.read(self.mapping[name])


def as_source(weights, path='<weights>'):
    """`weights` as a WeightSource: one already, or a mapping name -> array."""
    return weights if isinstance(weights, WeightSource) else DictSource(weights, path)


class SafetensorsFile(WeightSource):
    """A `.safetensors` file, memory-mapped; `.metadata` is its `__metadata__`."""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        try:
            with open(path, 'rb') as f:
                head = f.read(8)
                (length,) = struct.unpack('<Q', head)
                if length > size - 8:
                    raise ValueError(f"header length {length} exceeds the file size {size}")
                header = json.loads(f.read(length))
            self.metadata = header.pop('__metadata__', None) or {}
            self.entries, start = {}, 8 + length
            for name, entry in header.items():
                dtype = _ST_DTYPES[entry['dtype']]
                begin, end = entry['data_offsets']
                if end - begin != math.prod(entry['shape']) * itemsize(dtype) or start + end > size:
                    raise ValueError(f"tensor {name} lies outside the file (offsets {begin}..{end}, file {size} "
                                     f"bytes)")
                self.entries[name] = (dtype, tuple(entry['shape']), start + begin)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as err:
            raise CorruptWeightsError(path, first_line(err), 'safetensors file') from None
        self._file = open(path, 'rb')  # pylint: disable=consider-using-with
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b''

    def names(self):
        return list(self.entries)

    def shape(self, name):
        return self.entries[name][1]

    def dtype(self, name):
        return self.entries[name][0]

    def _read(self, name):
        """A copy of the tensor's bytes; the file pages it touched are dropped from this process (they stay in the
        page cache), so reading a whole file one tensor at a time never holds more than one tensor."""
        dtype, shape, offset = self.entries[name]
        stored = np.uint16 if dtype == 'bfloat16' else np.dtype(dtype)
        count = math.prod(shape)
        value = np.frombuffer(self._map, dtype=stored, count=count, offset=offset).reshape(shape).copy()
        if count and hasattr(self._map, 'madvise') and hasattr(mmap, 'MADV_DONTNEED'):
            start = offset - offset % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, offset + value.nbytes - start)
        return value


class TorchFile(WeightSource):
    """A PyTorch state-dict file, `torch.load(weights_only=True)`, memory-mapped when its format allows."""

    def __init__(self, path):
        import torch  # only needed for PyTorch files
        self.path = path
        try:
            try:
                state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError as err:
                if 'mmap' not in str(err):
                    raise
                state = torch.load(path, map_location='cpu', weights_only=True)  # the legacy format: read whole
        except Exception as err:  # torch's RuntimeError/UnpicklingError/EOFError
            raise CorruptWeightsError(path, first_line(err)[:200], 'PyTorch weight file') from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
        self.tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return str(self.tensors[name].dtype).replace('torch.', '')

    def read(self, name):
        import torch
        value = self.tensors[name].detach()
        return (value.to(torch.float32) if value.dtype == torch.bfloat16 else value).numpy()


class CkptFile(DictSource):
    """A MindSpore `.ckpt` (or a safetensors file MindSpore reads), read whole by `ms.load_checkpoint`."""

    def __init__(self, path):
        from mindformers.tools.checkpoint import load_checkpoint_file
        super().__init__(load_checkpoint_file(path), path)


class ShardedSource(WeightSource):
    """A sharded set: an `*.index.json` whose `weight_map` names each tensor's shard file (beside the index)."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, encoding='utf-8') as f:
                weight_map = json.load(f).get('weight_map')
        except (ValueError, AttributeError) as err:
            raise CheckpointError(f"index {path} is not a JSON object with a weight_map ({first_line(err)})") \
                from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"index {path} has no 'weight_map'")
        directory = os.path.dirname(os.path.abspath(path))
        self.weight_map = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
        absent = sorted({os.path.basename(f) for f in self.weight_map.values() if not os.path.isfile(f)})
        if absent:
            raise CheckpointError(f"sharded checkpoint {path} lacks shard file(s) {listing(absent)} in {directory}")
        self._shards = {}

    def shard(self, name):
        """The open source of the shard holding `name`."""
        file = self.weight_map[name]
        if file not in self._shards:
            self._shards[file] = open_weights(file)
        source = self._shards[file]
        if name not in source:
            raise CheckpointError(f"index {self.path} places {name} in {os.path.basename(file)}, which does not "
                                  f"hold it")
        return source

    def names(self):
        return list(self.weight_map)

    def shape(self, name):
        return self.shard(name).shape(name)

    def dtype(self, name):
        return self.shard(name).dtype(name)

    def read(self, name):
        return self.shard(name).read(name)


def find_weights(directory):
    """The weight file (or index) a directory holds: HuggingFace's names first, else the one `*.index.json`, else
    `tools.checkpoint.resolve_checkpoint` (a checkpoint directory: rank_0/, meta.json, the newest file)."""
    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    indexes = sorted(f for f in os.listdir(directory) if f.endswith(INDEX_SUFFIX) and not f.startswith('.'))
    if len(indexes) > 1:
        raise CheckpointError(f"{directory} holds several weight indexes ({', '.join(indexes)}); keep one")
    if indexes:
        return os.path.join(directory, indexes[0])
    return resolve_checkpoint(directory)


def open_weights(path):
    """A WeightSource for `path` (see the module docstring); unreadable input raises CheckpointError naming it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = find_weights(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"weights not found: {path}")
    if path.endswith(INDEX_SUFFIX):
        return ShardedSource(path)
    if path.endswith('.safetensors'):
        return SafetensorsFile(path)
    if path.endswith(('.bin', '.pt', '.pth')):
        return TorchFile(path)
    if path.endswith('.ckpt'):
        return CkptFile(path)
    raise CheckpointError(f"unsupported weight file {path} (expected .safetensors, *.index.json, .bin, .pt, .pth or "
                          f".ckpt)")


# ---------------------------------------------------------------------------------------------------------------
# loading into a model

def _np_dtype(ms_dtype):
    import mindspore as ms
    return {ms.float32: np.float32, ms.float16: np.float16, ms.float64: np.float64, ms.int8: np.int8,
            ms.uint8: np.uint8, ms.int32: np.int32, ms.int64: np.int64, ms.bool_: np.bool_}.get(ms_dtype)


def to_parameter_tensor(array, dtype):
    """A MindSpore tensor of `dtype` holding `array` (one copy; bfloat16 through float32)."""
    import mindspore as ms
    target = _np_dtype(dtype)
    if target is not None:
        return ms.Tensor(np.ascontiguousarray(array, dtype=target))
    return ms.Tensor(np.ascontiguousarray(array, dtype=np.float32)).astype(dtype)


def set_parameter(param, array):
    """Replace `param`'s data by `array` (cast to the parameter's dtype)."""
    param.set_data(to_parameter_tensor(array, param.dtype))


@contextlib.contextmanager
def no_weight_init():
    """Parameters created inside (from MindSpore initializers, as every layer here makes them) hold no data until
    `load_weights` sets them or `init_remaining` initialises them: a model built for a checkpoint costs neither the
    time nor the memory of random weights. `mindspore.nn.utils.no_init_parameters` (deprecated in MindSpore 2.10
    but present); without it, parameters are initialised as usual."""
    try:
        from mindspore.nn.utils import no_init_parameters
    except ImportError:
        yield
        return
    with no_init_parameters():
        yield


def built_for_checkpoint(build):
    """`build()`'s model, built without initialising the weights its checkpoint (loaded while it is built, e.g. its
    config's `checkpoint_name_or_path`) sets; what the checkpoint lacks gets its initial values."""
    with no_weight_init():
        return init_remaining(build())


def init_remaining(model):
    """Give every Parameter of `model` still without data its initial values; returns `model`."""
    for param in model.get_parameters():
        if param.has_init:
            param.init_data()
    return model


def load_weights(model, items, source, transform=None, strict=True, ignore=None, optional=()):
    """Set `model`'s Parameters from `items` (iterable of (our name, np.ndarray)), one at a time.

    `transform(name, array)` -> iterable of (name, array) runs on each item first (e.g. quantizing). Each array is
    cast to its parameter's dtype and dropped once set. `ignore(name)` -> bool: entries to skip silently (e.g.
    optimizer state); default: names whose first component is none of the model's. Returns the names of the
    parameters not set. With `strict`, after all items: one CheckpointError naming every missing, unexpected and
    mis-shaped tensor (well-shaped ones are set even then); `optional` names may be missing (a PET delta next to
    base weights). Parameters left unset that were built without data (`no_weight_init`) get their initial
    values."""
    params = {p.name: p for p in model.get_parameters()}
    if ignore is None:
        roots = {name.split('.', 1)[0] for name in params}
        ignore = lambda name: name.split('.', 1)[0] not in roots  # noqa: E731
    loaded, unexpected, mismatched = set(), [], []
    for name, array in items:
        for target, value in (transform(name, array) if transform else ((name, array),)):
            param = params.get(target)
            if param is None:
                if not ignore(target):
                    unexpected.append(target)
                continue
            if tuple(value.shape) != tuple(param.shape):
                mismatched.append(f"{target} (checkpoint {tuple(value.shape)}, model {tuple(param.shape)})")
                continue
            set_parameter(param, value)
            loaded.add(target)
        del array
    missing = [name for name in params if name not in loaded]
    init_remaining(model)
    required = [name for name in missing if name not in set(optional)]
    if strict and (required or unexpected or mismatched):
        problems = [f"{label} {listing(names)}" for label, names in (
            ('missing', required), ('unexpected', unexpected), ('shape mismatch', mismatched)) if names]
        raise CheckpointError(f"checkpoint {source} does not fit {type(model).__name__}: {'; '.join(problems)}")
    return missing


def source_items(source, names=None):
    """(name, array) of `source`'s tensors (or of `names`), read one at a time."""
    for name in (source.names() if names is None else names):
        yield name, source.read(name)


# ---------------------------------------------------------------------------------------------------------------
# writing

def _header(specs):
    """safetensors header bytes (padded to 8) and the data size for specs [(name, dtype, shape)]."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * itemsize(dtype)
        header[name] = {'dtype': _ST_CODES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + size]}
        offset += size
    return header, offset


def write_safetensors(path, specs, arrays, metadata=None):
    """Write a safetensors file at `path` (atomically: a hidden temporary file, then rename) from `specs`
    [(name, dtype, shape)] and `arrays`, an iterable giving each spec's array in order (cast to its dtype;
    'bfloat16' takes float32 values or uint16 bits). Only one array is held at a time."""
    header, _ = _header(specs)
    header['__metadata__'] = {'format': 'pt', **(metadata or {})}
    blob = json.dumps(header, separators=(',', ':')).encode('utf-8')
    blob += b' ' * (-len(blob) % 8)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.partial.{os.getpid()}")
    try:
        with open(tmp, 'wb') as f:
            f.write(struct.pack('<Q', len(blob)))
            f.write(blob)
            count = 0
            for (name, dtype, shape), array in zip(specs, arrays):
                array = np.asarray(array)
                if tuple(array.shape) != tuple(shape):
                    raise ValueError(f"tensor {name} has shape {tuple(array.shape)}, its header says {tuple(shape)}")
                if dtype == 'bfloat16':
                    array = array if array.dtype == np.uint16 else fp32_to_bf16(array)
                else:
                    array = np.ascontiguousarray(array, dtype=dtype)
                f.write(memoryview(np.ascontiguousarray(array)).cast('B'))
                count += 1
            if count != len(specs):
                raise ValueError(f"{len(specs) - count} tensor(s) of {path} were not given")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_path(directory)
    return path


def parse_size(size):
    """Bytes of `size`: an int, or a string such as '5GB', '500MB', '2GiB' (HuggingFace's spelling)."""
    if isinstance(size, int) and size > 0:
        return size
    text = str(size).strip().upper()
    units = {'KIB': 2 ** 10, 'MIB': 2 ** 20, 'GIB': 2 ** 30, 'TIB': 2 ** 40, 'KB': 10 ** 3, 'MB': 10 ** 6,
             'GB': 10 ** 9, 'TB': 10 ** 12, 'B': 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                value = float(text[:-len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
    raise ValueError(f"max_shard_size must be a positive number of bytes or a string such as '2GB' or '500MB', got "
                     f"{size!r}")


def plan_shards(specs, max_shard_size):
    """Split specs [(name, dtype, shape)] in order into shards of at most `max_shard_size` bytes each (a tensor
    larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * itemsize(spec[1])
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    return shards + ([current] if current else [])


def save_sharded(directory, specs, read, max_shard_size=None, prefix='model'):
    """Write tensors as `<prefix>.safetensors`, or, when they exceed `max_shard_size` (bytes or '2GB'), as
    `<prefix>-00001-of-0000N.safetensors` shards plus `<prefix>.safetensors.index.json` (HuggingFace's index
    format), the index last. `specs`: [(name, dtype, shape)]; `read(name)` -> the array, called once per tensor
    while writing. Returns the path of the file or index written."""
    shards = plan_shards(specs, parse_size(max_shard_size)) if max_shard_size is not None else [list(specs)]
    if len(shards) <= 1:
        return write_safetensors(os.path.join(directory, f'{prefix}.safetensors'), specs,
                                 (read(name) for name, _, _ in specs))
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file = f'{prefix}-{number:05d}-of-{len(shards):05d}.safetensors'
        write_safetensors(os.path.join(directory, file), shard, (read(name) for name, _, _ in shard))
        for name, dtype, shape in shard:
            weight_map[name] = file
            total += math.prod(shape) * itemsize(dtype)
    return write_json_atomic(os.path.join(directory, f'{prefix}.safetensors{INDEX_SUFFIX}'),
                             {'metadata': {'total_size': total}, 'weight_map': weight_map})


def parameter_specs(params):
    """[(name, dtype, shape)] of MindSpore Parameters (dtype as a NumPy name, 'bfloat16' kept)."""
    return [(p.name, str(p.dtype).lower(), tuple(p.shape))
            for p in params]
