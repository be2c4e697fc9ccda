// A Go net/http server as a real upstream for the tests: 127.0.0.1:-port, answering 200 on
// every path and method (the request body is read and discarded), with idle keep-alive
// connections closed after http.Server.IdleTimeout = -idle.
//
//	foreign-go -port 8080 -idle 2s     (a Go duration, or a plain number of milliseconds)
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

func parseIdle(s string) (time.Duration, error) {
	if ms, err := strconv.ParseInt(s, 10, 64); err == nil {
		return time.Duration(ms) * time.Millisecond, nil
	}
	return time.ParseDuration(s)
}

func main() {
	port := flag.Int("port", 0, "TCP port to listen on at 127.0.0.1 (required)")
	idleFlag := flag.String("idle", "", "http.Server.IdleTimeout: a Go duration (2s, 1500ms) or milliseconds (required)")
	flag.Parse()
	idle, err := parseIdle(*idleFlag)
	if *port <= 0 || *port > 65535 || err != nil || idle <= 0 {
		fmt.Fprintf(os.Stderr, "usage: %s -port PORT -idle DURATION|MS (got -port %d -idle %q)\n",
			os.Args[0], *port, *idleFlag)
		os.Exit(2)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "ok\n")
	})
	server := &http.Server{
		Handler:     handler,
		IdleTimeout: idle,
		ErrorLog:    log.New(io.Discard, "", 0),
	}
	listener, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(*port)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "foreign-go: %v\n", err)
		os.Exit(1)
	}
	if err := server.Serve(listener); err != nil {
		fmt.Fprintf(os.Stderr, "foreign-go: %v\n", err)
		os.Exit(1)
	}
}
