"""Generated protobuf/gRPC code for the meshsec.v1 API (proto/meshsec/v1).

Regenerate with ``proto/generate.sh``; never edit the ``*_pb2*`` files.
"""
