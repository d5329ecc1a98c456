// Node's cluster serving HTTP hello world: the node rows of benchmarks/policy_bench (which runs it).
//   node benchmarks/node/hello_cluster.js --workers N --port P [--policy rr|none]
// --policy sets cluster.schedulingPolicy before the first fork: rr is SCHED_RR (the primary
// accepts and hands each connection to a worker in turn), none is SCHED_NONE (the workers share
// the listening socket and the kernel picks). Prints `listening on 127.0.0.1:PORT` once every
// worker listens; on SIGTERM asks each worker how many connections it served, prints
// {"workers":[{"id":1,"connections":N},...]} and exits 0.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

if (cluster.isWorker) {
  let connections = 0;
  const body = `hello from worker ${cluster.worker.id}\n`;
  const server = http.createServer((req, res) => {
    const found = req.url === '/';
    const text = found ? body : 'not found\n';
    res.writeHead(found ? 200 : 404, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(text) });
    res.end(text);
  });
  server.on('connection', () => { ++connections; });
  server.listen(Number(process.env.BENCH_PORT), '127.0.0.1');
  process.on('message', (m) => { if (m === 'count') process.send({ connections }); });
  process.on('SIGTERM', () => {});  // the primary decides when we leave: we exit when it disconnects
} else {
  const args = { workers: 2, port: 0, policy: 'rr' };
  for (let i = 2; i < process.argv.length; ++i) {
    const [name, inline] = process.argv[i].replace(/^--/, '').split('=');
    const value = inline !== undefined ? inline : process.argv[++i];
    if (!(name in args) || value === undefined || (name === 'policy' && !['rr', 'none'].includes(value))) {
      console.error('usage: node hello_cluster.js --workers N --port P [--policy rr|none]');
      process.exit(64);
    }
    args[name] = name === 'policy' ? value : Number(value);
  }
  cluster.schedulingPolicy = args.policy === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;

  let listening = 0;
  let stopping = false;
  cluster.on('listening', (worker, address) => {
    if (++listening === args.workers) console.log(`listening on 127.0.0.1:${address.port}`);
  });
  cluster.on('exit', (worker, code, signal) => {
    if (!stopping) console.error(`hello_cluster.js: worker ${worker.id} exited (${signal || code})`);
  });
  // (--port 0 works too: in a cluster every worker's listen(0) gets the same port.)
  for (let i = 0; i < args.workers; ++i) cluster.fork({ BENCH_PORT: String(args.port) });

  process.on('SIGTERM', () => {
    if (stopping) return;
    stopping = true;
    const workers = Object.values(cluster.workers);
    const counts = new Map();
    const report = () => {
      const list = workers.map((w) => ({ id: w.id, connections: counts.has(w.id) ? counts.get(w.id) : null }));
      process.stdout.write(`${JSON.stringify({ workers: list })}\n`, () => {
        for (const w of workers) w.process.kill('SIGKILL');
        process.exit(0);
      });
    };
    const timer = setTimeout(report, 5000);
    for (const w of workers) {
      w.on('message', (m) => {
        if (m && typeof m.connections === 'number') counts.set(w.id, m.connections);
        if (counts.size === workers.length) { clearTimeout(timer); report(); }
      });
      w.send('count');
    }
  });
}
