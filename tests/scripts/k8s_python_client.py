"""An independent wire check: the Python `kubernetes` client's WebSocket
exec and port-forward against a streaming URL from huskd (Debian's
python3-kubernetes; run with /usr/bin/python3).

  k8s_python_client.py exec URL          -> prints JSON {stdout, stderr, rc}
  k8s_python_client.py portforward URL P -> prints the HTTP response of GET / through port P
"""
import json
import sys

from kubernetes.client import Configuration
from kubernetes.stream.ws_client import PortForward, WSClient, create_websocket


def ws_url(url):
    return url.replace("http://", "ws://", 1)


def do_exec(url):
    ws = WSClient(Configuration(), ws_url(url), headers=None, capture_all=True)
    ws.write_stdin("line-from-python\n")
    ws.run_forever(timeout=20)
    print(json.dumps({"stdout": ws.read_stdout(), "stderr": ws.read_stderr(), "rc": ws.returncode}))


def do_portforward(url, port):
    sep = "&" if "?" in url else "?"
    ws = create_websocket(Configuration(), ws_url(url) + sep + "ports=" + str(port))
    pf = PortForward(ws, [port])
    s = pf.socket(port)
    s.setblocking(True)
    s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    err = pf.error(port)
    sys.stdout.write(json.dumps({"body": data.decode("utf-8", "replace"), "error": err}))
    s.close()
    pf.close()


if __name__ == "__main__":
    if sys.argv[1] == "exec":
        do_exec(sys.argv[2])
    else:
        do_portforward(sys.argv[2], int(sys.argv[3]))
