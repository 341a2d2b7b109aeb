from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_TUNNEL: _ClassVar[Mode]
    MODE_TRANSPORT: _ClassVar[Mode]

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[Protocol]
    PROTOCOL_ESP: _ClassVar[Protocol]
    PROTOCOL_AH: _ClassVar[Protocol]
    PROTOCOL_AH_ESP: _ClassVar[Protocol]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_PROTECT: _ClassVar[Action]
    ACTION_BYPASS: _ClassVar[Action]
    ACTION_DISCARD: _ClassVar[Action]

class Encapsulation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCAPSULATION_UNSPECIFIED: _ClassVar[Encapsulation]
    ENCAPSULATION_UDP: _ClassVar[Encapsulation]
    ENCAPSULATION_NONE: _ClassVar[Encapsulation]
MODE_UNSPECIFIED: Mode
MODE_TUNNEL: Mode
MODE_TRANSPORT: Mode
PROTOCOL_UNSPECIFIED: Protocol
PROTOCOL_ESP: Protocol
PROTOCOL_AH: Protocol
PROTOCOL_AH_ESP: Protocol
ACTION_UNSPECIFIED: Action
ACTION_PROTECT: Action
ACTION_BYPASS: Action
ACTION_DISCARD: Action
ENCAPSULATION_UNSPECIFIED: Encapsulation
ENCAPSULATION_UDP: Encapsulation
ENCAPSULATION_NONE: Encapsulation

class EnrollRequest(_message.Message):
    __slots__ = ("node_name", "csr_der", "join_token")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    csr_der: bytes
    join_token: str
    def __init__(self, node_name: _Optional[str] = ..., csr_der: _Optional[bytes] = ..., join_token: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("node_name", "csr_der")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    csr_der: bytes
    def __init__(self, node_name: _Optional[str] = ..., csr_der: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("certificate_chain_der", "ca_certificates_der", "not_after")
    CERTIFICATE_CHAIN_DER_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATES_DER_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    certificate_chain_der: _containers.RepeatedScalarFieldContainer[bytes]
    ca_certificates_der: _containers.RepeatedScalarFieldContainer[bytes]
    not_after: int
    def __init__(self, certificate_chain_der: _Optional[_Iterable[bytes]] = ..., ca_certificates_der: _Optional[_Iterable[bytes]] = ..., not_after: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("node_name", "since_version")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    since_version: int
    def __init__(self, node_name: _Optional[str] = ..., since_version: _Optional[int] = ...) -> None: ...

class PeerPolicy(_message.Message):
    __slots__ = ("mode", "protocol", "encapsulation", "ike_proposals", "esp_proposals", "ike_lifetime_s", "child_lifetime_s", "dpd_interval_s", "replay_window", "action", "rule", "child_lifetime_bytes", "child_lifetime_packets", "allow_no_replay")
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ENCAPSULATION_FIELD_NUMBER: _ClassVar[int]
    IKE_PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    ESP_PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    IKE_LIFETIME_S_FIELD_NUMBER: _ClassVar[int]
    CHILD_LIFETIME_S_FIELD_NUMBER: _ClassVar[int]
    DPD_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    REPLAY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    CHILD_LIFETIME_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHILD_LIFETIME_PACKETS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NO_REPLAY_FIELD_NUMBER: _ClassVar[int]
    mode: Mode
    protocol: Protocol
    encapsulation: Encapsulation
    ike_proposals: _containers.RepeatedScalarFieldContainer[str]
    esp_proposals: _containers.RepeatedScalarFieldContainer[str]
    ike_lifetime_s: float
    child_lifetime_s: float
    dpd_interval_s: float
    replay_window: int
    action: Action
    rule: str
    child_lifetime_bytes: int
    child_lifetime_packets: int
    allow_no_replay: bool
    def __init__(self, mode: _Optional[_Union[Mode, str]] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., encapsulation: _Optional[_Union[Encapsulation, str]] = ..., ike_proposals: _Optional[_Iterable[str]] = ..., esp_proposals: _Optional[_Iterable[str]] = ..., ike_lifetime_s: _Optional[float] = ..., child_lifetime_s: _Optional[float] = ..., dpd_interval_s: _Optional[float] = ..., replay_window: _Optional[int] = ..., action: _Optional[_Union[Action, str]] = ..., rule: _Optional[str] = ..., child_lifetime_bytes: _Optional[int] = ..., child_lifetime_packets: _Optional[int] = ..., allow_no_replay: _Optional[bool] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("name", "identity", "endpoints", "subnets", "policy", "initiate", "ike_port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    INITIATE_FIELD_NUMBER: _ClassVar[int]
    IKE_PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    identity: str
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    subnets: _containers.RepeatedScalarFieldContainer[str]
    policy: PeerPolicy
    initiate: bool
    ike_port: int
    def __init__(self, name: _Optional[str] = ..., identity: _Optional[str] = ..., endpoints: _Optional[_Iterable[str]] = ..., subnets: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[PeerPolicy, _Mapping]] = ..., initiate: _Optional[bool] = ..., ike_port: _Optional[int] = ...) -> None: ...

class ViewUpdate(_message.Message):
    __slots__ = ("version", "full", "node_name", "identity", "subnets", "endpoints", "upserted_peers", "removed_peers", "revoked_serials", "unrevoked_serials")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    UPSERTED_PEERS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_PEERS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_SERIALS_FIELD_NUMBER: _ClassVar[int]
    UNREVOKED_SERIALS_FIELD_NUMBER: _ClassVar[int]
    version: int
    full: bool
    node_name: str
    identity: str
    subnets: _containers.RepeatedScalarFieldContainer[str]
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    upserted_peers: _containers.RepeatedCompositeFieldContainer[Peer]
    removed_peers: _containers.RepeatedScalarFieldContainer[str]
    revoked_serials: _containers.RepeatedScalarFieldContainer[bytes]
    unrevoked_serials: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, version: _Optional[int] = ..., full: _Optional[bool] = ..., node_name: _Optional[str] = ..., identity: _Optional[str] = ..., subnets: _Optional[_Iterable[str]] = ..., endpoints: _Optional[_Iterable[str]] = ..., upserted_peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., removed_peers: _Optional[_Iterable[str]] = ..., revoked_serials: _Optional[_Iterable[bytes]] = ..., unrevoked_serials: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("name", "state", "ike_state", "child_sas", "last_handshake", "last_error", "last_error_at", "endpoint", "bytes_in", "bytes_out", "packets_in", "packets_out", "drops", "sa", "rule", "mtu")
    class DropsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IKE_STATE_FIELD_NUMBER: _ClassVar[int]
    CHILD_SAS_FIELD_NUMBER: _ClassVar[int]
    LAST_HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_AT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    PACKETS_IN_FIELD_NUMBER: _ClassVar[int]
    PACKETS_OUT_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    SA_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    ike_state: str
    child_sas: int
    last_handshake: int
    last_error: str
    last_error_at: int
    endpoint: str
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    drops: _containers.ScalarMap[str, int]
    sa: str
    rule: str
    mtu: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., ike_state: _Optional[str] = ..., child_sas: _Optional[int] = ..., last_handshake: _Optional[int] = ..., last_error: _Optional[str] = ..., last_error_at: _Optional[int] = ..., endpoint: _Optional[str] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., packets_in: _Optional[int] = ..., packets_out: _Optional[int] = ..., drops: _Optional[_Mapping[str, int]] = ..., sa: _Optional[str] = ..., rule: _Optional[str] = ..., mtu: _Optional[int] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("node_name", "view_version", "cert_not_after", "tun_mtu", "underlay_mtu", "peers", "drops", "uptime_s", "view_source", "local_address")
    class DropsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    VIEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    CERT_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    TUN_MTU_FIELD_NUMBER: _ClassVar[int]
    UNDERLAY_MTU_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    VIEW_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    view_version: int
    cert_not_after: int
    tun_mtu: int
    underlay_mtu: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    drops: _containers.ScalarMap[str, int]
    uptime_s: float
    view_source: str
    local_address: str
    def __init__(self, node_name: _Optional[str] = ..., view_version: _Optional[int] = ..., cert_not_after: _Optional[int] = ..., tun_mtu: _Optional[int] = ..., underlay_mtu: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ..., drops: _Optional[_Mapping[str, int]] = ..., uptime_s: _Optional[float] = ..., view_source: _Optional[str] = ..., local_address: _Optional[str] = ...) -> None: ...

class StatusReportResponse(_message.Message):
    __slots__ = ("report_interval_s",)
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    report_interval_s: float
    def __init__(self, report_interval_s: _Optional[float] = ...) -> None: ...

class GetMeshRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MeshStatus(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
