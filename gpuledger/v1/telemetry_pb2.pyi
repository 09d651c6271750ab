from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HostFacts(_message.Message):
    __slots__ = ("host_id", "hostname", "provider", "region", "instance_type", "gpu_count", "tags", "agent_version", "instance_id")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    hostname: str
    provider: str
    region: str
    instance_type: str
    gpu_count: int
    tags: _containers.ScalarMap[str, str]
    agent_version: str
    instance_id: str
    def __init__(self, host_id: _Optional[str] = ..., hostname: _Optional[str] = ..., provider: _Optional[str] = ..., region: _Optional[str] = ..., instance_type: _Optional[str] = ..., gpu_count: _Optional[int] = ..., tags: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("uuid", "index", "name", "mem_total_bytes", "util_method", "mig", "parent_uuid", "share", "first_window_ms")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTIL_METHOD_FIELD_NUMBER: _ClassVar[int]
    MIG_FIELD_NUMBER: _ClassVar[int]
    PARENT_UUID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    FIRST_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    name: str
    mem_total_bytes: int
    util_method: str
    mig: bool
    parent_uuid: str
    share: float
    first_window_ms: int
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., mem_total_bytes: _Optional[int] = ..., util_method: _Optional[str] = ..., mig: _Optional[bool] = ..., parent_uuid: _Optional[str] = ..., share: _Optional[float] = ..., first_window_ms: _Optional[int] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "start_ms", "command", "container_id", "pod_uid", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PID_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_ms: int
    command: str
    container_id: str
    pod_uid: str
    tags: _containers.ScalarMap[str, str]
    def __init__(self, pid: _Optional[int] = ..., start_ms: _Optional[int] = ..., command: _Optional[str] = ..., container_id: _Optional[str] = ..., pod_uid: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WindowBatch(_message.Message):
    __slots__ = ("agent_id", "agent_epoch", "seq", "host", "gpus", "processes", "gpu_windows_arrow", "proc_windows_arrow", "dropped_windows", "sent_ms", "session_start_ms", "stopped_ms", "endpoint_windows_arrow")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    GPU_WINDOWS_ARROW_FIELD_NUMBER: _ClassVar[int]
    PROC_WINDOWS_ARROW_FIELD_NUMBER: _ClassVar[int]
    DROPPED_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    SENT_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_START_MS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_MS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_WINDOWS_ARROW_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    agent_epoch: int
    seq: int
    host: HostFacts
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    gpu_windows_arrow: bytes
    proc_windows_arrow: bytes
    dropped_windows: int
    sent_ms: int
    session_start_ms: int
    stopped_ms: int
    endpoint_windows_arrow: bytes
    def __init__(self, agent_id: _Optional[str] = ..., agent_epoch: _Optional[int] = ..., seq: _Optional[int] = ..., host: _Optional[_Union[HostFacts, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ..., gpu_windows_arrow: _Optional[bytes] = ..., proc_windows_arrow: _Optional[bytes] = ..., dropped_windows: _Optional[int] = ..., sent_ms: _Optional[int] = ..., session_start_ms: _Optional[int] = ..., stopped_ms: _Optional[int] = ..., endpoint_windows_arrow: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "code", "message", "stored_windows", "retryable", "max_batch_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STORED_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: int
    message: str
    stored_windows: int
    retryable: bool
    max_batch_bytes: int
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., stored_windows: _Optional[int] = ..., retryable: _Optional[bool] = ..., max_batch_bytes: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("report", "since_ms", "until_ms", "by", "filters")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REPORT_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    report: str
    since_ms: int
    until_ms: int
    by: str
    filters: _containers.ScalarMap[str, str]
    def __init__(self, report: _Optional[str] = ..., since_ms: _Optional[int] = ..., until_ms: _Optional[int] = ..., by: _Optional[str] = ..., filters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("arrow", "currency", "pricing_source", "since_ms", "until_ms")
    ARROW_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PRICING_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    arrow: bytes
    currency: str
    pricing_source: str
    since_ms: int
    until_ms: int
    def __init__(self, arrow: _Optional[bytes] = ..., currency: _Optional[str] = ..., pricing_source: _Optional[str] = ..., since_ms: _Optional[int] = ..., until_ms: _Optional[int] = ...) -> None: ...

class RetireRequest(_message.Message):
    __slots__ = ("host_id", "at_ms", "note")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    at_ms: int
    note: str
    def __init__(self, host_id: _Optional[str] = ..., at_ms: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class RetireReply(_message.Message):
    __slots__ = ("host_id", "at_ms", "state")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    at_ms: int
    state: str
    def __init__(self, host_id: _Optional[str] = ..., at_ms: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class ImportIssue(_message.Message):
    __slots__ = ("file", "line", "column", "value", "message", "refused")
    FILE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    file: str
    line: int
    column: str
    value: str
    message: str
    refused: bool
    def __init__(self, file: _Optional[str] = ..., line: _Optional[int] = ..., column: _Optional[str] = ..., value: _Optional[str] = ..., message: _Optional[str] = ..., refused: _Optional[bool] = ...) -> None: ...

class ImportChunk(_message.Message):
    __slots__ = ("kind", "file_name", "arrow", "slice_keys", "final", "issues", "refused_rows")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    ARROW_FIELD_NUMBER: _ClassVar[int]
    SLICE_KEYS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_ROWS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    file_name: str
    arrow: bytes
    slice_keys: _containers.RepeatedScalarFieldContainer[str]
    final: bool
    issues: _containers.RepeatedCompositeFieldContainer[ImportIssue]
    refused_rows: int
    def __init__(self, kind: _Optional[str] = ..., file_name: _Optional[str] = ..., arrow: _Optional[bytes] = ..., slice_keys: _Optional[_Iterable[str]] = ..., final: _Optional[bool] = ..., issues: _Optional[_Iterable[_Union[ImportIssue, _Mapping]]] = ..., refused_rows: _Optional[int] = ...) -> None: ...

class ImportFile(_message.Message):
    __slots__ = ("file_name", "rows_stored", "rows_refused", "refusals")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_STORED_FIELD_NUMBER: _ClassVar[int]
    ROWS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    rows_stored: int
    rows_refused: int
    refusals: _containers.RepeatedCompositeFieldContainer[ImportIssue]
    def __init__(self, file_name: _Optional[str] = ..., rows_stored: _Optional[int] = ..., rows_refused: _Optional[int] = ..., refusals: _Optional[_Iterable[_Union[ImportIssue, _Mapping]]] = ...) -> None: ...

class ImportReply(_message.Message):
    __slots__ = ("rows_stored", "slices_replaced", "files", "warnings", "import_id")
    ROWS_STORED_FIELD_NUMBER: _ClassVar[int]
    SLICES_REPLACED_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    IMPORT_ID_FIELD_NUMBER: _ClassVar[int]
    rows_stored: int
    slices_replaced: _containers.RepeatedScalarFieldContainer[str]
    files: _containers.RepeatedCompositeFieldContainer[ImportFile]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    import_id: int
    def __init__(self, rows_stored: _Optional[int] = ..., slices_replaced: _Optional[_Iterable[str]] = ..., files: _Optional[_Iterable[_Union[ImportFile, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., import_id: _Optional[int] = ...) -> None: ...
