// The lab's Node.js upstream: node's own `http` server with `server.keepAliveTimeout` set
// from the command line, answering every method with a small JSON body after reading the
// request body in full (so POSTs exercise the same path a real app does).
// Usage: node node_server.js PORT KEEP_ALIVE_TIMEOUT_MS [HOST (default 127.0.0.1)]
'use strict';
const http = require('http');

const port = Number(process.argv[2]);
const keepAliveTimeoutMs = Number(process.argv[3]);
if (!Number.isInteger(port) || !Number.isInteger(keepAliveTimeoutMs) || keepAliveTimeoutMs <= 0) {
  console.error('usage: node node_server.js PORT KEEP_ALIVE_TIMEOUT_MS');
  process.exit(64);
}

const server = http.createServer((req, res) => {
  let bytes = 0;
  req.on('data', (chunk) => { bytes += chunk.length; });
  req.on('end', () => {
    const body = JSON.stringify({ server: 'node', method: req.method, path: req.url, bytes });
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
    res.end(body);
  });
});
// The setting under test. Node (v20) really closes an idle connection about 1 s later than
// this (keepAliveTimeoutBuffer); the tuner measures that instead of assuming it.
server.keepAliveTimeout = keepAliveTimeoutMs;
// A first burst opens up to 1,000 connections at once; Node's default backlog (511) would
// drop the SYNs beyond it and the proxy would retry them a second later.
server.listen(port, process.argv[4] || '127.0.0.1', 4096);
process.on('SIGTERM', () => { server.close(); process.exit(0); });
