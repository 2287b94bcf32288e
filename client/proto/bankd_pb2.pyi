from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncoderFingerprint(_message.Message):
    __slots__ = ("model_id", "config_sha256", "weights_sha256")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    config_sha256: str
    weights_sha256: str
    def __init__(self, model_id: _Optional[str] = ..., config_sha256: _Optional[str] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class KeyFunction(_message.Message):
    __slots__ = ("name", "config_json", "weights_safetensors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    weights_safetensors: bytes
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ..., weights_safetensors: _Optional[bytes] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("entries", "key_dim", "value_shape", "value_dtype", "index_type", "metric", "vision_encoder", "text_encoder", "key_function", "max_k", "max_batch", "bank_id", "server_version", "embed_available", "search_device", "max_message_bytes", "nprobe", "ef_search", "max_nprobe", "max_ef_search", "recall", "recall_k", "search_engine")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    KEY_DIM_FIELD_NUMBER: _ClassVar[int]
    VALUE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VISION_ENCODER_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    KEY_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BANK_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBED_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    MAX_NPROBE_FIELD_NUMBER: _ClassVar[int]
    MAX_EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    RECALL_K_FIELD_NUMBER: _ClassVar[int]
    SEARCH_ENGINE_FIELD_NUMBER: _ClassVar[int]
    entries: int
    key_dim: int
    value_shape: _containers.RepeatedScalarFieldContainer[int]
    value_dtype: DType
    index_type: str
    metric: str
    vision_encoder: EncoderFingerprint
    text_encoder: EncoderFingerprint
    key_function: KeyFunction
    max_k: int
    max_batch: int
    bank_id: str
    server_version: str
    embed_available: bool
    search_device: str
    max_message_bytes: int
    nprobe: int
    ef_search: int
    max_nprobe: int
    max_ef_search: int
    recall: float
    recall_k: int
    search_engine: str
    def __init__(self, entries: _Optional[int] = ..., key_dim: _Optional[int] = ..., value_shape: _Optional[_Iterable[int]] = ..., value_dtype: _Optional[_Union[DType, str]] = ..., index_type: _Optional[str] = ..., metric: _Optional[str] = ..., vision_encoder: _Optional[_Union[EncoderFingerprint, _Mapping]] = ..., text_encoder: _Optional[_Union[EncoderFingerprint, _Mapping]] = ..., key_function: _Optional[_Union[KeyFunction, _Mapping]] = ..., max_k: _Optional[int] = ..., max_batch: _Optional[int] = ..., bank_id: _Optional[str] = ..., server_version: _Optional[str] = ..., embed_available: _Optional[bool] = ..., search_device: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., max_nprobe: _Optional[int] = ..., max_ef_search: _Optional[int] = ..., recall: _Optional[float] = ..., recall_k: _Optional[int] = ..., search_engine: _Optional[str] = ...) -> None: ...

class ExcludeIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("keys", "k", "exclude", "with_values", "request_id", "nprobe", "ef_search", "values_region")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    WITH_VALUES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    VALUES_REGION_FIELD_NUMBER: _ClassVar[int]
    keys: Tensor
    k: int
    exclude: _containers.RepeatedCompositeFieldContainer[ExcludeIds]
    with_values: bool
    request_id: str
    nprobe: int
    ef_search: int
    values_region: SharedMemoryRegion
    def __init__(self, keys: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., exclude: _Optional[_Iterable[_Union[ExcludeIds, _Mapping]]] = ..., with_values: _Optional[bool] = ..., request_id: _Optional[str] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., values_region: _Optional[_Union[SharedMemoryRegion, _Mapping]] = ...) -> None: ...

class SharedMemoryRegion(_message.Message):
    __slots__ = ("name", "offset", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    size: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("ids", "scores", "values", "request_id", "values_in_region")
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_IN_REGION_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    scores: Tensor
    values: Tensor
    request_id: str
    values_in_region: bool
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., values_in_region: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SearchStreamResponse(_message.Message):
    __slots__ = ("request_id", "result", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: SearchResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[SearchResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("ids", "with_keys")
    IDS_FIELD_NUMBER: _ClassVar[int]
    WITH_KEYS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    with_keys: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., with_keys: _Optional[bool] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("values", "keys")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    keys: Tensor
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "texts")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: Tensor
    def __init__(self, keys: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
