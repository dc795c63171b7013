"""An independent gRPC client (Debian's python3-grpcio, gRPC core in C) for
CRI calls on a unix socket with a chosen HTTP/2 `:authority`, as kubelet's
and crictl's grpc-go sends it (run with /usr/bin/python3).

  cri_authority_client.py SOCKET AUTHORITY
      AUTHORITY: the `grpc.default_authority` channel option ("-": grpcio's default)
      -> prints JSON {method: {"ok", "code", "details", "fields"}} for
         RuntimeService Version and ListPodSandbox, ImageService ListImages
         and ImageFsInfo; "fields" maps each top-level protobuf field number
         of the response to its count (and Version's strings to their values).

No generated stubs: requests are hand-encoded protobuf (empty messages are
b"", VersionRequest{version: "v1"} is b"\\n\\x02v1") and responses are
decoded only as far as the test asserts.
"""
import json
import sys

import grpc

CALLS = [
    ("/runtime.v1.RuntimeService/Version", b"\n\x02v1"),
    ("/runtime.v1.RuntimeService/ListPodSandbox", b""),
    ("/runtime.v1.ImageService/ListImages", b""),
    ("/runtime.v1.ImageService/ImageFsInfo", b""),
]


def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def top_level_fields(buf):
    """{field number: [raw values]} of one protobuf message (wire types 0, 1, 2, 5)."""
    out = {}
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError("wire type %d" % wt)
        out.setdefault(num, []).append(v)
    return out


def call(channel, method, request):
    rpc = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        resp = rpc(request, timeout=20)
    except grpc.RpcError as e:
        return {"ok": False, "code": e.code().name, "details": e.details()}
    fields = top_level_fields(resp)
    summary = {str(k): len(v) for k, v in fields.items()}
    if method.endswith("/Version"):
        summary = {str(k): v[0].decode() for k, v in fields.items()}
    return {"ok": True, "code": "OK", "details": "", "fields": summary}


def main():
    socket, authority = sys.argv[1], sys.argv[2]
    options = [] if authority == "-" else [("grpc.default_authority", authority)]
    with grpc.insecure_channel("unix:" + socket, options=options) as channel:
        print(json.dumps({m.rsplit("/", 1)[1]: call(channel, m, r) for m, r in CALLS}))


if __name__ == "__main__":
    main()
