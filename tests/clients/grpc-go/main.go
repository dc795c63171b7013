// A CRI client on grpc-go, dialing huskd the way kubelet and crictl do, for
// tests/tests/cri_authority.rs. Built offline from Debian's packages
// (golang-go, golang-google-grpc-dev, golang-google-protobuf-dev,
// golang-golang-x-net-dev) in GOPATH mode: no generated stubs, requests are
// hand-encoded with protowire and sent through a raw-bytes codec.
//
//	grpc-go-cri SOCKET IMAGE LOGDIR HANDLER
//
// prints one JSON object: for every dial form (see forms below) the
// `:authority` grpc-go actually put on the wire (read back from the bytes it
// wrote) and the result of Version, ListPodSandbox, ListImages and
// ImageFsInfo; then, on the percent-encoded form, a pod's whole life:
// RunPodSandbox, CreateContainer, StartContainer, ExecSync, ContainerStatus,
// StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// rawCodec passes hand-encoded protobuf bytes through unchanged.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// capConn records the first bytes the client writes (the HTTP/2 preface,
// SETTINGS and the first HEADERS) so the real `:authority` can be decoded.
type capConn struct {
	net.Conn
	mu  *sync.Mutex
	buf *bytes.Buffer
}

func (c capConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.buf.Len() < 64<<10 {
		c.buf.Write(p)
	}
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// sentAuthority decodes the `:authority` of the first request HEADERS.
func sentAuthority(b []byte) string {
	const preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
	if !bytes.HasPrefix(b, []byte(preface)) {
		return "<no HTTP/2 preface>"
	}
	fr := http2.NewFramer(io.Discard, bytes.NewReader(b[len(preface):]))
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return "<no HEADERS: " + err.Error() + ">"
		}
		if h, ok := f.(*http2.MetaHeadersFrame); ok {
			for _, hf := range h.Fields {
				if hf.Name == ":authority" {
					return hf.Value
				}
			}
			return "<none>"
		}
	}
}

type form struct {
	Name      string `json:"name"`
	Target    string `json:"target"`
	Authority string `json:"with_authority,omitempty"`
	Dialer    bool   `json:"context_dialer"`
}

type result struct {
	OK     bool              `json:"ok"`
	Code   string            `json:"code,omitempty"`
	Error  string            `json:"error,omitempty"`
	Fields map[string]int    `json:"fields,omitempty"`
	Values map[string]string `json:"values,omitempty"`
}

type conn struct {
	cc  *grpc.ClientConn
	mu  sync.Mutex
	buf bytes.Buffer
}

func dial(f form, sock string) (*conn, error) {
	c := &conn{}
	opts := []grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock()}
	if f.Authority != "" {
		opts = append(opts, grpc.WithAuthority(f.Authority))
	}
	if f.Dialer {
		// kubelet's dialer (k8s.io/kubernetes/pkg/kubelet/util): a unix
		// connection to the socket, whatever the target string says.
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			nc, err := d.DialContext(ctx, "unix", sock)
			if err != nil {
				return nil, err
			}
			return capConn{nc, &c.mu, &c.buf}, nil
		}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cc, err := grpc.DialContext(ctx, f.Target, opts...)
	if err != nil {
		return nil, err
	}
	c.cc = cc
	return c, nil
}

func (c *conn) call(method string, req []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out []byte
	err := c.cc.Invoke(ctx, method, &req, &out, grpc.ForceCodec(rawCodec{}))
	return out, err
}

// fields counts each top-level field number of a message, and keeps the
// length-delimited ones that are valid UTF-8 text as values.
func fields(b []byte) (map[string]int, map[string]string) {
	n, v := map[string]int{}, map[string]string{}
	for len(b) > 0 {
		num, typ, l := protowire.ConsumeTag(b)
		if l < 0 {
			return n, v
		}
		b = b[l:]
		key := fmt.Sprint(num)
		n[key]++
		if typ == protowire.BytesType {
			s, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return n, v
			}
			v[key] = string(s)
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return n, v
		}
		if typ == protowire.VarintType {
			x, _ := protowire.ConsumeVarint(b)
			v[key] = fmt.Sprint(x)
		}
		b = b[m:]
	}
	return n, v
}

func res(out []byte, err error) result {
	if err != nil {
		s, _ := status.FromError(err)
		return result{Code: s.Code().String(), Error: s.Message()}
	}
	n, v := fields(out)
	return result{OK: true, Fields: n, Values: v}
}

// ---- hand-encoded requests (field numbers of runtime.v1's api.proto) ----

func str(b []byte, num protowire.Number, s string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func msg(b []byte, num protowire.Number, m []byte) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, m)
}

func varint(b []byte, num protowire.Number, x uint64) []byte {
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, x)
}

func podConfig(name, logdir string) []byte {
	var meta []byte
	meta = str(meta, 1, name)        // name
	meta = str(meta, 2, "uid-"+name) // uid
	meta = str(meta, 3, "grpc-go")   // namespace
	var p []byte
	p = msg(p, 1, meta)
	p = str(p, 2, name) // hostname
	p = str(p, 3, logdir)
	return p
}

func lifecycle(c *conn, image, logdir, handler string) map[string]result {
	r := map[string]result{}
	pcfg := podConfig("grpc-go-pod", logdir)
	var req []byte
	req = msg(req, 1, pcfg)
	req = str(req, 2, handler)
	out, err := c.call("/runtime.v1.RuntimeService/RunPodSandbox", req)
	r["RunPodSandbox"] = res(out, err)
	if err != nil {
		return r
	}
	_, v := fields(out)
	pod := v["1"]
	var ccfg, meta, img []byte
	meta = str(meta, 1, "main")
	img = str(img, 1, image)
	ccfg = msg(ccfg, 1, meta)
	ccfg = msg(ccfg, 2, img)
	for _, a := range []string{"sleep", "3600"} {
		ccfg = str(ccfg, 3, a) // command
	}
	ccfg = str(ccfg, 11, "main.log")
	req = nil
	req = str(req, 1, pod)
	req = msg(req, 2, ccfg)
	req = msg(req, 3, pcfg)
	out, err = c.call("/runtime.v1.RuntimeService/CreateContainer", req)
	r["CreateContainer"] = res(out, err)
	if err == nil {
		_, v = fields(out)
		id := v["1"]
		idReq := str(nil, 1, id)
		out, err = c.call("/runtime.v1.RuntimeService/StartContainer", idReq)
		r["StartContainer"] = res(out, err)
		req = str(nil, 1, id)
		for _, a := range []string{"sh", "-c", "echo grpc-go:$(hostname); exit 3"} {
			req = str(req, 2, a)
		}
		req = varint(req, 3, 30)
		out, err = c.call("/runtime.v1.RuntimeService/ExecSync", req)
		r["ExecSync"] = res(out, err)
		out, err = c.call("/runtime.v1.RuntimeService/ContainerStatus", idReq)
		st := res(out, err)
		if err == nil {
			// ContainerStatus.state (3): 1 = CONTAINER_RUNNING.
			_, sv := fields(out)
			sn, svv := fields([]byte(sv["1"]))
			st.Fields, st.Values = sn, svv
		}
		r["ContainerStatus"] = st
		out, err = c.call("/runtime.v1.RuntimeService/StopContainer", varint(idReq, 2, 10))
		r["StopContainer"] = res(out, err)
		out, err = c.call("/runtime.v1.RuntimeService/RemoveContainer", idReq)
		r["RemoveContainer"] = res(out, err)
	}
	podReq := str(nil, 1, pod)
	out, err = c.call("/runtime.v1.RuntimeService/StopPodSandbox", podReq)
	r["StopPodSandbox"] = res(out, err)
	out, err = c.call("/runtime.v1.RuntimeService/RemovePodSandbox", podReq)
	r["RemovePodSandbox"] = res(out, err)
	out, err = c.call("/runtime.v1.RuntimeService/ListPodSandbox", nil)
	r["ListPodSandboxAfter"] = res(out, err)
	return r
}

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: grpc-go-cri SOCKET IMAGE LOGDIR HANDLER")
		os.Exit(2)
	}
	sock, image, logdir, handler := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	// grpc-go < 1.60's authority for kubelet's target: the socket path,
	// percent-encoded (url.PathEscape also escapes '/').
	encoded := url.PathEscape(sock)
	forms := []form{
		// kubelet <= 1.29 (k8s.io/kubernetes/pkg/kubelet/util.GetAddressAndDialer):
		// the bare path as the target, its own unix dialer.
		{Name: "bare-path+dialer", Target: sock, Dialer: true},
		// crictl / kubelet with a `unix://` endpoint and grpc-go's own dialer.
		{Name: "unix-scheme", Target: "unix://" + sock},
		{Name: "unix-scheme+dialer", Target: "unix://" + sock, Dialer: true},
		// The authorities grpc-go 1.4x-1.59 and >= 1.60 put there.
		{Name: "percent-encoded", Target: sock, Dialer: true, Authority: encoded},
		{Name: "localhost", Target: sock, Dialer: true, Authority: "localhost"},
		{Name: "plain-path", Target: sock, Dialer: true, Authority: sock},
	}
	type formOut struct {
		form
		Sent  string            `json:"sent_authority"`
		Dial  string            `json:"dial_error,omitempty"`
		Calls map[string]result `json:"calls"`
	}
	out := map[string]interface{}{}
	var all []formOut
	var keep *conn
	for _, f := range forms {
		fo := formOut{form: f, Calls: map[string]result{}}
		c, err := dial(f, sock)
		if err != nil {
			fo.Dial = err.Error()
			all = append(all, fo)
			continue
		}
		var version []byte
		version = str(version, 1, "v1")
		for _, m := range []struct {
			name, method string
			req          []byte
		}{
			{"Version", "/runtime.v1.RuntimeService/Version", version},
			{"ListPodSandbox", "/runtime.v1.RuntimeService/ListPodSandbox", nil},
			{"ListImages", "/runtime.v1.ImageService/ListImages", nil},
			{"ImageFsInfo", "/runtime.v1.ImageService/ImageFsInfo", nil},
		} {
			o, err := c.call(m.method, m.req)
			fo.Calls[m.name] = res(o, err)
		}
		c.mu.Lock()
		if f.Dialer {
			fo.Sent = sentAuthority(c.buf.Bytes())
		} else {
			fo.Sent = "<not captured: grpc-go's own dialer>"
		}
		c.mu.Unlock()
		all = append(all, fo)
		if f.Name == "percent-encoded" {
			keep = c
		} else {
			c.cc.Close()
		}
	}
	out["forms"] = all
	if keep != nil {
		out["lifecycle"] = lifecycle(keep, image, logdir, handler)
		keep.cc.Close()
	}
	out["grpc_version"] = grpc.Version
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
