// Node's cluster doing ipc_bench's work: the third column of benchmarks/ipc_bench (which runs it).
//   node benchmarks/node/ipc_bench.js [--oneway=N] [--rtt=N] [--fd=N] [--warmup=N] [--spawn-repeats=N]
// Prints one JSON object on its last line: oneway_msgs_per_s, rtt_p50_us, rtt_p99_us,
// fd_pass_per_s, spawn_ms_1, spawn_ms_8, spawn_ms_32 (64-byte string messages).
'use strict';
const cluster = require('node:cluster');
const net = require('node:net');
const { once } = require('node:events');

if (cluster.isWorker) {
  // BENCH_MODE says which work, BENCH_COUNT how much (as in ipc_bench.cpp).
  const mode = process.env.BENCH_MODE;
  const count = Number(process.env.BENCH_COUNT);
  let seen = 0;
  let sockets = 0;
  if (mode === 'oneway') {
    process.on('message', () => { if (++seen === count) process.send('done'); });
  } else if (mode === 'echo') {
    process.on('message', (m) => process.send(m));
  } else if (mode === 'fd') {
    process.on('message', (m, socket) => {
      if (socket) { socket.destroy(); ++sockets; }
      if (++seen === count) process.send(String(sockets));
    });
  } else {
    process.on('message', () => {});  // "spawn": stay until the master disconnects
  }
} else {
  const arg = (name, fallback) => {
    const a = process.argv.find((s) => s.startsWith(`--${name}=`));
    return a ? Number(a.slice(name.length + 3)) : fallback;
  };
  const n = { oneway: arg('oneway', 200000), rtt: arg('rtt', 20000), fd: arg('fd', 50000), warmup: arg('warmup', 1000),
    spawnRepeats: arg('spawn-repeats', 3) };
  const now = () => process.hrtime.bigint();
  const secondsSince = (t0) => Number(now() - t0) / 1e9;
  const percentile = (sorted, p) => sorted[Math.min(Math.max(Math.ceil(p * sorted.length), 1), sorted.length) - 1];

  const forkOnline = async (mode, count) => {
    const w = cluster.fork({ BENCH_MODE: mode, BENCH_COUNT: String(count) });
    await once(w, 'online');
    return w;
  };
  const finish = async (w) => {
    const exited = once(w, 'exit');
    w.disconnect();
    await exited;
  };

  const oneway = async () => {
    const w = await forkOnline('oneway', n.oneway);
    const payload = 'x'.repeat(64);
    const done = once(w, 'message');
    const t0 = now();
    for (let i = 0; i < n.oneway; ++i) w.send(payload);
    await done;
    const rate = n.oneway / secondsSince(t0);
    await finish(w);
    return rate;
  };

  const rtt = async () => {
    const w = await forkOnline('echo', 0);
    const payload = 'p'.repeat(64);
    const us = [];
    for (let i = 0; i < n.warmup + n.rtt; ++i) {
      const t0 = now();
      const reply = once(w, 'message');
      w.send(payload);
      await reply;
      if (i >= n.warmup) us.push(Number(now() - t0) / 1e3);
    }
    await finish(w);
    us.sort((a, b) => a - b);
    return [percentile(us, 0.5), percentile(us, 0.99)];
  };

  // Sends `count` times with at most `window` sends not yet written (cocluster's send queue is
  // 256 too). Node queues handle sends in an array until each is acknowledged; queueing all
  // 50000 up front made that superlinear (5000: 2800/s, 20000: 840/s).
  const sendWindowed = (w, count, args, window = 256) => new Promise((resolve, reject) => {
    let sent = 0;
    let written = 0;
    const more = () => {
      for (; sent < count && sent - written < window; ++sent) {
        w.send(...args, (err) => {
          if (err) return reject(err);
          if (++written === count) resolve();
          else more();
        });
      }
    };
    more();
  });

  // Sends one connected socket n times (keepOpen: the worker gets a new fd each time and drops it).
  const fdPass = async () => {
    const w = await forkOnline('fd', n.fd);
    const server = net.createServer();
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const accepted = once(server, 'connection');
    const client = net.connect(server.address().port, '127.0.0.1');
    await once(client, 'connect');
    const [peer] = await accepted;
    const done = once(w, 'message');
    const t0 = now();
    await sendWindowed(w, n.fd, ['fd', client, { keepOpen: true }]);
    const [got] = await done;
    const rate = n.fd / secondsSince(t0);
    if (got !== String(n.fd)) throw new Error(`worker received ${got} sockets of ${n.fd}`);
    client.destroy();
    peer.destroy();
    server.close();
    await finish(w);
    return rate;
  };

  const spawn = async (size) => {
    const t0 = now();
    const workers = [];
    for (let i = 0; i < size; ++i) workers.push(cluster.fork({ BENCH_MODE: 'spawn', BENCH_COUNT: '0' }));
    await Promise.all(workers.map((w) => once(w, 'online')));
    const ms = secondsSince(t0) * 1e3;
    const exits = workers.map((w) => once(w, 'exit'));
    cluster.disconnect();
    await Promise.all(exits);
    return ms;
  };

  const main = async () => {
    setTimeout(() => { console.error('ipc_bench.js: timed out'); process.exit(2); }, 150e3).unref();
    const out = { oneway_msgs_per_s: await oneway() };
    [out.rtt_p50_us, out.rtt_p99_us] = await rtt();
    out.fd_pass_per_s = await fdPass();
    for (const size of [1, 8, 32]) {  // the median of spawnRepeats runs
      const ms = [];
      for (let i = 0; i < n.spawnRepeats; ++i) ms.push(await spawn(size));
      out[`spawn_ms_${size}`] = percentile(ms.sort((a, b) => a - b), 0.5);
    }
    console.log(JSON.stringify(out));
  };
  main().catch((e) => { console.error('ipc_bench.js:', e); process.exit(1); });
}
