# Generated from proto/kvsched/v1 by scripts/gen_proto.py. DO NOT EDIT.
