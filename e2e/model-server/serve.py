"""A small but real model server for Moat's local cluster, on Python's standard library only.

    serve.py [serve] --model DIR --port PORT [--host H] [--ssl-certfile C --ssl-keyfile K
             [--ssl-ca-certs CA] [--ssl-cert-reqs 0|2]]
                                               the model server (vLLM's flags)
    serve.py files --dir DIR --port PORT --cert C --key K
                                               an HTTPS file server (the model artifact store)
    serve.py request URL [--cert C --key K] [--ca CA] [--data JSON]
                                               a client: prints the HTTP status and the body;
                                               exits 0 on 2xx, 4 on another status, 3 when no
                                               answer came (refused, timed out, TLS failed)

The model is a logistic regression, `model.json` in DIR: {"features": [names], "weights":
[numbers], "bias": number}. At start the server reads every file in DIR (the decrypted model
Moat mounts read-only) and reports their bytes and sha256 at GET /v1/model. POST /v1/score with
{"features": {name: number}} answers {"score": ..., "client": <the caller's URI SAN>}.

TLS, as vLLM takes it: --ssl-certfile and --ssl-keyfile (Moat's serving certificate, for example
$(MOAT_TLS_CERT_FILE)) make the server speak HTTPS; --ssl-cert-reqs 2 with --ssl-ca-certs makes
it require a client certificate from that CA (mTLS) and refuse the handshake of any client
without one (1: verify one if offered). Without the flags, the files named by
MOAT_TLS_CERT_FILE, MOAT_TLS_KEY_FILE and MOAT_TLS_CA_FILE are used, with client certificates
required; with neither, the server refuses to start rather than serve plain HTTP, unless it
listens on loopback only (--host 127.0.0.1): behind Moat's gate, which terminates mTLS in the
same pod and names the caller in the header x-moat-client-identity.
"""

import argparse
import hashlib
import http.server
import json
import math
import os
import ssl
import sys
import urllib.error
import urllib.request


def log(message):
    print(message, file=sys.stderr, flush=True)


def load_model(directory):
    with open(os.path.join(directory, "model.json"), encoding="utf-8") as f:
        model = json.load(f)
    if len(model["features"]) != len(model["weights"]):
        raise ValueError("model.json: features and weights differ in length")
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            digest = hashlib.sha256()
            size = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            files[os.path.relpath(path, directory)] = {"bytes": size, "sha256": digest.hexdigest()}
    return model, files


def peer_identity(sock):
    """The URI SANs of the client's certificate (its SPIFFE ID), or None."""
    cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    if not cert:
        return None
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    return uris[0] if uris else None


class TlsServer(http.server.ThreadingHTTPServer):
    """Handshakes in the request's thread, so one slow or refused client never blocks others."""

    daemon_threads = True
    context = None

    def get_request(self):
        sock, addr = self.socket.accept()
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request, client_address):
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(10)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                log(f"TLS handshake with {client_address[0]} refused: {e}")
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


def server_context(cert, key, ca, verify=ssl.CERT_REQUIRED):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca:
        context.verify_mode = verify
        context.load_verify_locations(ca)
    return context


def serve(args):
    model, files = load_model(args.model)
    log(f"model {args.model}: {len(files)} files, {sum(f['bytes'] for f in files.values())} bytes")

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {"status": "ok"})
            elif self.path == "/v1/model":
                self.reply(200, {"features": model["features"], "files": files})
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self):
            if self.path != "/v1/score":
                return self.reply(404, {"error": "not found"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if length > 65536:
                    return self.reply(413, {"error": "request too large"})
                features = json.loads(self.rfile.read(length))["features"]
                x = [float(features[name]) for name in model["features"]]
            except (ValueError, KeyError, TypeError) as e:
                return self.reply(400, {"error": f"bad request: {e}"})
            z = model["bias"] + sum(w * v for w, v in zip(model["weights"], x))
            # The logistic function, without overflowing for large |z|.
            score = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
            self.reply(200, {"score": score, "client": self.caller()})

        def caller(self):
            # Behind the gate (plain HTTP on loopback) the gate names the verified caller.
            if behind_gate:
                return self.headers.get("x-moat-client-identity")
            return peer_identity(self.connection)

        def log_message(self, format, *a):
            log(f"{self.client_address[0]} {self.caller()} {format % a}")

    behind_gate = args.host in ("127.0.0.1", "::1") and not (args.ssl_certfile or args.ssl_keyfile)
    httpd = TlsServer((args.host, args.port), Handler)
    if behind_gate:
        log(f"serving on {args.host}:{args.port} (plain HTTP on loopback, behind Moat's gate)")
        return httpd.serve_forever()
    verify = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL, 2: ssl.CERT_REQUIRED}[args.ssl_cert_reqs]
    if args.ssl_certfile or args.ssl_keyfile:
        if not (args.ssl_certfile and args.ssl_keyfile):
            sys.exit("serve.py: --ssl-certfile and --ssl-keyfile go together")
        if verify != ssl.CERT_NONE and not args.ssl_ca_certs:
            sys.exit("serve.py: --ssl-cert-reqs 1 or 2 needs --ssl-ca-certs")
        cert, key = args.ssl_certfile, args.ssl_keyfile
        ca = args.ssl_ca_certs if verify != ssl.CERT_NONE else None
    else:
        cert, key = os.environ.get("MOAT_TLS_CERT_FILE"), os.environ.get("MOAT_TLS_KEY_FILE")
        ca, verify = os.environ.get("MOAT_TLS_CA_FILE"), ssl.CERT_REQUIRED
        if not (cert and key and ca):
            sys.exit("serve.py: no TLS flags and no MOAT_TLS_* files: refusing to serve plain HTTP")
    httpd.context = server_context(cert, key, ca, verify)
    log(f"serving on :{args.port} ({'mTLS' if httpd.context.verify_mode == ssl.CERT_REQUIRED else 'TLS'})")
    httpd.serve_forever()


def files(args):
    directory = args.dir

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=directory, **kw)

        def log_message(self, format, *a):
            log(f"{self.client_address[0]} {format % a}")

    httpd = TlsServer(("", args.port), Handler)
    httpd.context = server_context(args.cert, args.key, None)
    log(f"serving {directory} over HTTPS on :{args.port}")
    httpd.serve_forever()


def request(args):
    context = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    data = args.data.encode() if args.data is not None else None
    req = urllib.request.Request(args.url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=context, timeout=args.timeout) as r:
            print(r.status)
            print(r.read().decode())
    except urllib.error.HTTPError as e:
        print(e.code)
        print(e.read().decode())
        return 4
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        print(f"refused: {reason}", file=sys.stderr)
        return 3
    return 0


def main():
    parser = argparse.ArgumentParser(prog="serve.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--ssl-ca-certs")
    p.add_argument("--ssl-cert-reqs", type=int, choices=[0, 1, 2], default=0)
    p = sub.add_parser("files")
    p.add_argument("--dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p = sub.add_parser("request")
    p.add_argument("url")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    p.add_argument("--data")
    p.add_argument("--timeout", type=float, default=5)
    argv = sys.argv[1:]
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve"] + argv  # vLLM's form: the server's flags alone
    args = parser.parse_args(argv)
    return {"serve": serve, "files": files, "request": request}[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
