"""kvsched-client: the worker and router side of the kvsched.v1 contract.

Needs only grpcio and protobuf, so an inference engine can embed it.
"""

__version__ = "0.1.0"
