// Command cfssl-authsign is a compiled, anchor-compatible exec helper that signs the node's
// CSR through CFSSL's authenticated /api/v1/cfssl/authsign endpoint.
//
// It does exactly what helpers/examples/cfssl_authsign.py does, with the Go standard library
// only, so an exec'd helper costs about a millisecond of CPU instead of the tens of
// milliseconds an exec'd Python interpreter needs. Use it when the provisioner runs in exec
// mode (one helper process per node) and must reach thousands of nodes a minute.
//
// Settings come from the environment (list these names in the provisioner's helper_env):
//
//	CFSSL_URL            e.g. http://127.0.0.1:8888 (required; https:// works too)
//	CFSSL_TLS_CA         CA bundle to verify an https CFSSL with (default: system store)
//	CFSSL_PROFILE        signing profile with an auth_key (default "node")
//	CFSSL_AUTH_KEY_FILE  file holding the profile's hex HMAC key (required)
//	CFSSL_LABEL          multirootca label (optional)
//	CFSSL_CA_FILE        CA bundle to hand to nodes; fetched from /info when unset
//	BROKERS              comma-separated overlay broker URLs for the node (required)
//	COLLECTIVES          default "choria"
//	HTTP_TIMEOUT         seconds, default 5
//
// Input: the helper JSON on stdin (identity, csr with csr/ssldir, ...). Output: certificate,
// ca, ssldir and a configuration that always sets plugin.choria.server.provision=false. Any
// failure: one line on stderr and exit status 1, which the provisioner records; the node stays
// provisionable. The HMAC key never appears in any output.
package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// maxAnswer bounds how much of a CFSSL answer is read.
const maxAnswer = 4 << 20

type csrInput struct {
	CSR    string `json:"csr"`
	SSLDir string `json:"ssldir"`
}

type helperInput struct {
	Identity string    `json:"identity"`
	CSR      *csrInput `json:"csr"`
}

type helperOutput struct {
	Defer         bool              `json:"defer"`
	Msg           string            `json:"msg"`
	Certificate   string            `json:"certificate"`
	CA            string            `json:"ca"`
	SSLDir        string            `json:"ssldir"`
	Configuration map[string]string `json:"configuration"`
}

type cfsslAnswer struct {
	Success bool `json:"success"`
	Errors  []struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"errors"`
	Result json.RawMessage `json:"result"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cfssl-authsign: "+format+"\n", args...)
	os.Exit(1)
}

func getenv(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func require(name string) string {
	v := os.Getenv(name)
	if v == "" {
		fail("%s is not set", name)
	}
	return v
}

func newClient(timeout time.Duration) *http.Client {
	transport := &http.Transport{Proxy: nil, DisableCompression: true}
	if bundle := os.Getenv("CFSSL_TLS_CA"); bundle != "" {
		pem, err := os.ReadFile(bundle)
		if err != nil {
			fail("cannot read CFSSL_TLS_CA %s: %v", bundle, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fail("CFSSL_TLS_CA %s holds no PEM certificate", bundle)
		}
		transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{
		Timeout:   timeout,
		Transport: transport,
		// CFSSL never redirects; following one would resend the HMAC-authenticated body to
		// wherever the answer points.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// post sends body to CFSSL and returns the answer's result, or exits with CFSSL's errors.
func post(client *http.Client, base, path string, body []byte) json.RawMessage {
	resp, err := client.Post(strings.TrimRight(base, "/")+path, "application/json", bytes.NewReader(body))
	if err != nil {
		// err names the URL, which holds no secret: the HMAC key is only in the body's token
		fail("%s: cannot reach CFSSL: %v", path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		fail("%s: reading the answer: %v", path, err)
	}
	var answer cfsslAnswer
	if err := json.Unmarshal(raw, &answer); err != nil {
		fail("%s: %s, not JSON", path, resp.Status)
	}
	if !answer.Success {
		messages := make([]string, 0, len(answer.Errors))
		for _, e := range answer.Errors {
			messages = append(messages, e.Message)
		}
		text := strings.Join(messages, "; ")
		if text == "" {
			text = "refused"
		}
		fail("%s: %s: %s", path, resp.Status, text)
	}
	if len(answer.Result) == 0 || answer.Result[0] != '{' {
		fail("%s: no result in the answer", path)
	}
	return answer.Result
}

func certificateOf(result json.RawMessage, path string) string {
	var r struct {
		Certificate string `json:"certificate"`
	}
	if err := json.Unmarshal(result, &r); err != nil || r.Certificate == "" {
		fail("%s returned no certificate", path)
	}
	return r.Certificate
}

func main() {
	base := require("CFSSL_URL")
	keyFile := require("CFSSL_AUTH_KEY_FILE")
	brokers := require("BROKERS")
	profile := getenv("CFSSL_PROFILE", "node")
	label := os.Getenv("CFSSL_LABEL")
	collectives := getenv("COLLECTIVES", "choria")
	timeout, err := strconv.ParseFloat(getenv("HTTP_TIMEOUT", "5"), 64)
	if err != nil || timeout <= 0 {
		fail("HTTP_TIMEOUT must be a positive number of seconds")
	}

	var input helperInput
	if err := json.NewDecoder(io.LimitReader(os.Stdin, maxAnswer)).Decode(&input); err != nil ||
		input.Identity == "" || input.CSR == nil || input.CSR.CSR == "" {
		fail("input is not a helper request with identity and csr (is the pki feature on?)")
	}
	ssldir := input.CSR.SSLDir
	if ssldir == "" {
		ssldir = "/etc/choria/ssl"
	}

	keyText, err := os.ReadFile(keyFile)
	if err != nil {
		fail("cannot read a hex HMAC key from %s", keyFile)
	}
	key, err := hex.DecodeString(strings.TrimSpace(string(keyText)))
	if err != nil || len(key) == 0 {
		fail("cannot read a hex HMAC key from %s", keyFile)
	}

	sign := map[string]any{
		"certificate_request": input.CSR.CSR,
		"hosts":               []string{input.Identity},
		"profile":             profile,
	}
	if label != "" {
		sign["label"] = label
	}
	raw, _ := json.Marshal(sign)
	mac := hmac.New(sha256.New, key)
	mac.Write(raw)
	envelope, _ := json.Marshal(map[string]string{
		"token":   base64.StdEncoding.EncodeToString(mac.Sum(nil)),
		"request": base64.StdEncoding.EncodeToString(raw),
	})

	client := newClient(time.Duration(timeout * float64(time.Second)))
	certificate := certificateOf(post(client, base, "/api/v1/cfssl/authsign", envelope), "authsign")

	var ca string
	if caFile := os.Getenv("CFSSL_CA_FILE"); caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			fail("cannot read CFSSL_CA_FILE %s: %v", caFile, err)
		}
		ca = string(pem)
	} else {
		info := map[string]string{"profile": profile}
		if label != "" {
			info["label"] = label
		}
		body, _ := json.Marshal(info)
		ca = certificateOf(post(client, base, "/api/v1/cfssl/info", body), "info")
	}

	out := helperOutput{
		Msg:         "signed by cfssl profile " + profile,
		Certificate: certificate,
		CA:          ca,
		SSLDir:      ssldir,
		Configuration: map[string]string{
			"identity":                         input.Identity,
			"plugin.choria.server.provision":   "false",
			"plugin.choria.middleware_hosts":   brokers,
			"collectives":                      collectives,
			"main_collective":                  strings.SplitN(collectives, ",", 2)[0],
			"plugin.security.provider":         "file",
			"plugin.security.file.certificate": ssldir + "/certificate.pem",
			"plugin.security.file.key":         ssldir + "/private.pem",
			"plugin.security.file.ca":          ssldir + "/ca.pem",
		},
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing the answer: %v", err)
	}
}
