"""The part of Caffe's `caffe.proto` that reading AlexNet-family nets needs, built at runtime.

No generated `caffe_pb2` module and no protoc: the message types are described here as a
`FileDescriptorProto` with caffe.proto's field numbers and types (proto2), and turned into
classes in a private descriptor pool, so an installed `caffe` package cannot clash with them.
Fields left out (fillers, lr multipliers, solver settings, diffs, ...) are unknown to these
classes; protobuf skips unknown fields in binary files, and the prototxt reader asks
text_format to skip them too. Only fields whose values change the imported network are
declared, with caffe.proto's defaults where the default matters.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool

PACKAGE = "caffe"
_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {
    "string": _F.TYPE_STRING,
    "bool": _F.TYPE_BOOL,
    "uint32": _F.TYPE_UINT32,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
}

# (name, number, type, repeated, default, packed); a type that is not a scalar names a
# message or enum of this file ("Nested.Enum" for a nested enum).
Field = tuple[str, int, str, bool, str | None, bool]


def _f(name: str, number: int, type_: str, repeated: bool = False, default: str | None = None,
       packed: bool = False) -> Field:  # fmt: skip
    return (name, number, type_, repeated, default, packed)


# Enums at file level: Phase. Nested enums are listed with their message.
ENUMS: dict[str, list[tuple[str, int]]] = {"Phase": [("TRAIN", 0), ("TEST", 1)]}

V1_LAYER_TYPES: list[tuple[str, int]] = [
    ("NONE", 0), ("ABSVAL", 35), ("ACCURACY", 1), ("ARGMAX", 30), ("BNLL", 2), ("CONCAT", 3),
    ("CONTRASTIVE_LOSS", 37), ("CONVOLUTION", 4), ("DATA", 5), ("DECONVOLUTION", 39),
    ("DROPOUT", 6), ("DUMMY_DATA", 32), ("EUCLIDEAN_LOSS", 7), ("ELTWISE", 25), ("EXP", 38),
    ("FLATTEN", 8), ("HDF5_DATA", 9), ("HDF5_OUTPUT", 10), ("HINGE_LOSS", 28), ("IM2COL", 11),
    ("IMAGE_DATA", 12), ("INFOGAIN_LOSS", 13), ("INNER_PRODUCT", 14), ("LRN", 15),
    ("MEMORY_DATA", 29), ("MULTINOMIAL_LOGISTIC_LOSS", 16), ("MVN", 34), ("POOLING", 17),
    ("POWER", 26), ("RELU", 18), ("SIGMOID", 19), ("SIGMOID_CROSS_ENTROPY_LOSS", 27),
    ("SILENCE", 36), ("SOFTMAX", 20), ("SOFTMAX_LOSS", 21), ("SPLIT", 22), ("SLICE", 33),
    ("TANH", 23), ("WINDOW_DATA", 24), ("THRESHOLD", 31),
]  # fmt: skip

# message name -> (fields, nested enums)
MESSAGES: dict[str, tuple[list[Field], dict[str, list[tuple[str, int]]]]] = {
    "BlobShape": ([_f("dim", 1, "int64", True, packed=True)], {}),
    "BlobProto": (
        [
            _f("shape", 7, "BlobShape"),
            _f("data", 5, "float", True, packed=True),
            _f("double_data", 8, "double", True, packed=True),
            _f("num", 1, "int32", default="0"),
            _f("channels", 2, "int32", default="0"),
            _f("height", 3, "int32", default="0"),
            _f("width", 4, "int32", default="0"),
        ],
        {},
    ),
    "NetStateRule": ([_f("phase", 1, "Phase")], {}),
    "TransformationParameter": (
        [
            _f("scale", 1, "float", default="1"),
            _f("mean_file", 4, "string"),
            _f("mean_value", 5, "float", True),
        ],
        {},
    ),
    "ConvolutionParameter": (
        [
            _f("num_output", 1, "uint32"),
            _f("bias_term", 2, "bool", default="true"),
            _f("pad", 3, "uint32", True),
            _f("kernel_size", 4, "uint32", True),
            _f("group", 5, "uint32", default="1"),
            _f("stride", 6, "uint32", True),
            _f("pad_h", 9, "uint32", default="0"),
            _f("pad_w", 10, "uint32", default="0"),
            _f("kernel_h", 11, "uint32"),
            _f("kernel_w", 12, "uint32"),
            _f("stride_h", 13, "uint32"),
            _f("stride_w", 14, "uint32"),
            _f("axis", 16, "int32", default="1"),
            _f("dilation", 18, "uint32", True),
        ],
        {},
    ),
    "PoolingParameter": (
        [
            _f("pool", 1, "PoolingParameter.PoolMethod", default="MAX"),
            _f("kernel_size", 2, "uint32"),
            _f("stride", 3, "uint32", default="1"),
            _f("pad", 4, "uint32", default="0"),
            _f("kernel_h", 5, "uint32"),
            _f("kernel_w", 6, "uint32"),
            _f("stride_h", 7, "uint32"),
            _f("stride_w", 8, "uint32"),
            _f("pad_h", 9, "uint32", default="0"),
            _f("pad_w", 10, "uint32", default="0"),
            _f("global_pooling", 12, "bool", default="false"),
            _f("round_mode", 13, "PoolingParameter.RoundMode", default="CEIL"),
        ],
        {
            "PoolMethod": [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)],
            "RoundMode": [("CEIL", 0), ("FLOOR", 1)],
        },
    ),
    "LRNParameter": (
        [
            _f("local_size", 1, "uint32", default="5"),
            _f("alpha", 2, "float", default="1"),
            _f("beta", 3, "float", default="0.75"),
            _f("norm_region", 4, "LRNParameter.NormRegion", default="ACROSS_CHANNELS"),
            _f("k", 5, "float", default="1"),
        ],
        {"NormRegion": [("ACROSS_CHANNELS", 0), ("WITHIN_CHANNEL", 1)]},
    ),
    "InnerProductParameter": (
        [
            _f("num_output", 1, "uint32"),
            _f("bias_term", 2, "bool", default="true"),
            _f("axis", 5, "int32", default="1"),
            _f("transpose", 6, "bool", default="false"),
        ],
        {},
    ),
    "ReLUParameter": ([_f("negative_slope", 1, "float", default="0")], {}),
    "LayerParameter": (
        [
            _f("name", 1, "string"),
            _f("type", 2, "string"),
            _f("bottom", 3, "string", True),
            _f("top", 4, "string", True),
            _f("blobs", 7, "BlobProto", True),
            _f("include", 8, "NetStateRule", True),
            _f("exclude", 9, "NetStateRule", True),
            _f("transform_param", 100, "TransformationParameter"),
            _f("convolution_param", 106, "ConvolutionParameter"),
            _f("inner_product_param", 117, "InnerProductParameter"),
            _f("lrn_param", 118, "LRNParameter"),
            _f("pooling_param", 121, "PoolingParameter"),
            _f("relu_param", 123, "ReLUParameter"),
        ],
        {},
    ),
    "V1LayerParameter": (
        [
            _f("bottom", 2, "string", True),
            _f("top", 3, "string", True),
            _f("name", 4, "string"),
            _f("include", 32, "NetStateRule", True),
            _f("exclude", 33, "NetStateRule", True),
            _f("type", 5, "V1LayerParameter.LayerType"),
            _f("blobs", 6, "BlobProto", True),
            _f("convolution_param", 10, "ConvolutionParameter"),
            _f("inner_product_param", 17, "InnerProductParameter"),
            _f("lrn_param", 18, "LRNParameter"),
            _f("pooling_param", 19, "PoolingParameter"),
            _f("relu_param", 30, "ReLUParameter"),
            _f("transform_param", 36, "TransformationParameter"),
        ],
        {"LayerType": V1_LAYER_TYPES},
    ),
    "NetParameter": (
        [
            _f("name", 1, "string"),
            _f("layers", 2, "V1LayerParameter", True),
            _f("layer", 100, "LayerParameter", True),
        ],
        {},
    ),
}


def _enum(proto: descriptor_pb2.EnumDescriptorProto, values: list[tuple[str, int]]) -> None:
    for name, number in values:
        proto.value.add(name=name, number=number)


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The schema as a FileDescriptorProto (package `caffe`, proto2)."""
    fd = descriptor_pb2.FileDescriptorProto(name="bench_caffe.proto", package=PACKAGE)
    fd.syntax = "proto2"
    for name, values in ENUMS.items():
        _enum(fd.enum_type.add(name=name), values)
    for msg_name, (fields, enums) in MESSAGES.items():
        msg = fd.message_type.add(name=msg_name)
        for enum_name, values in enums.items():
            _enum(msg.enum_type.add(name=enum_name), values)
        for name, number, type_, repeated, default, packed in fields:
            field = msg.field.add(name=name, number=number)
            field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            if type_ in _TYPES:
                field.type = _TYPES[type_]
            else:
                is_enum = type_ in ENUMS or type_.split(".")[-1] in enums
                field.type = _F.TYPE_ENUM if is_enum else _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{type_}"
            if default is not None:
                field.default_value = default
            if packed:
                field.options.packed = True
    return fd


@cache
def messages() -> dict[str, Any]:
    """Message classes by short name ("NetParameter", "BlobProto", ...)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_descriptor())
    out = {}
    for name in MESSAGES:
        desc = pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
        out[name] = _message_class(desc)
    return out


def _message_class(desc: Any) -> Any:
    try:  # protobuf >= 4.21
        from google.protobuf.message_factory import GetMessageClass

        return GetMessageClass(desc)
    except ImportError:  # protobuf 3.20
        from google.protobuf.message_factory import MessageFactory

        return MessageFactory(desc.file.pool).GetPrototype(desc)
