"""A stand-in for the ``tensorrt`` module (TensorRT 10 Python API) for machines without TensorRT.

It follows the names and calls :mod:`export.engine` uses — ``Logger``, ``Builder.create_network(flags)``,
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, ``OnnxParser.parse_from_file``, ``INetworkDefinition``'s
``num_layers`` / ``get_layer`` / ``get_input`` / ``get_flag``, ``ILayer``'s ``name`` / ``type`` / ``precision`` /
``get_output(i).dtype`` / ``set_output_type``, ``IBuilderConfig.set_flag`` / ``set_memory_pool_limit``,
``build_serialized_network`` — and checks what the real one enforces here (no layer precision in a strongly
typed network). It builds nothing: the "parser" reads the layers from ``MODEL.onnx.layers.json`` (written by
the test: ``[[name, layer type, output dtype], ...]``), and the "plan" is a JSON record of what was asked, so a
test can see the network flags, builder flags and per-layer precisions. Never claims a real build.
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any

__version__ = os.environ.get("FAKE_TENSORRT_VERSION", "10.3.0.30")


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4


float32 = DataType.FLOAT
float16 = DataType.HALF
int8 = DataType.INT8
int32 = DataType.INT32


class LayerType(enum.IntEnum):
    CONVOLUTION = 0
    ACTIVATION = 2
    ELEMENTWISE = 5
    MATRIX_MULTIPLY = 16
    SLICE = 21
    CONCATENATION = 25
    SHUFFLE = 26
    CONSTANT = 31
    QUANTIZE = 40
    DEQUANTIZE = 41
    CAST = 44


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    OBEY_PRECISION_CONSTRAINTS = 12
    PREFER_PRECISION_CONSTRAINTS = 13


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class Logger:
    WARNING = 2

    def __init__(self, severity: int = 2):
        self.severity = severity


class _Tensor:
    def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...] = ()):
        self.name, self.dtype, self.shape = name, dtype, shape


class _Layer:
    def __init__(self, network: _Network, name: str, kind: LayerType, dtype: DataType):
        self._network = network
        self.name, self.type = name, kind
        self._precision = dtype
        self.precision_is_set = False
        self._outputs = [_Tensor(name + ":0", dtype)]
        self.output_types: dict[int, DataType] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> _Tensor:
        return self._outputs[index]

    @property
    def precision(self) -> DataType:
        return self._precision

    @precision.setter
    def precision(self, dtype: DataType) -> None:
        if self._network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            raise RuntimeError(f"{self.name}: layer precision cannot be set in a strongly typed network")
        self._precision, self.precision_is_set = dtype, True

    def set_output_type(self, index: int, dtype: DataType) -> None:
        if self._network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            raise RuntimeError(f"{self.name}: output types cannot be set in a strongly typed network")
        self.output_types[index] = dtype


class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.layers: list[_Layer] = []
        self.inputs: list[_Tensor] = []

    def get_flag(self, flag: NetworkDefinitionCreationFlag) -> bool:
        return bool(self.flags & (1 << int(flag)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> _Layer:
        return self.layers[index]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger):
        self.network = network
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]

    def parse_from_file(self, path: str) -> bool:
        spec = Path(path + ".layers.json")
        if not spec.exists():
            self.errors.append(f"fake tensorrt: no {spec.name} beside the model")
            return False
        d = json.loads(spec.read_text())
        self.network.inputs = [_Tensor(d["input"]["name"], DataType.FLOAT, tuple(d["input"]["shape"]))]
        self.network.inputs += [_Tensor(e["name"], DataType.FLOAT, tuple(e["shape"])) for e in d.get("extra_inputs", [])]
        for name, kind, dtype in d["layers"]:
            self.network.layers.append(_Layer(self.network, name, LayerType[kind], DataType[dtype]))
        return True


class _Config:
    def __init__(self):
        self.flags: set[str] = set()
        self.pools: dict[str, int] = {}
        self.profiles: list[Any] = []

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(BuilderFlag(flag).name)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[MemoryPoolType(pool).name] = int(size)

    def add_optimization_profile(self, profile: Any) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class _Profile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, lo: list[int], opt: list[int], hi: list[int]) -> None:
        self.shapes[name] = (lo, opt, hi)


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
        record = {"fake": True, "strongly_typed": network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED),
                  "builder_flags": sorted(config.flags),
                  "layers": {layer.name: {"precision": layer.precision.name, "precision_set": layer.precision_is_set,
                                          "output_types": {str(k): v.name for k, v in layer.output_types.items()}}
                             for layer in network.layers}}
        return json.dumps(record).encode()
