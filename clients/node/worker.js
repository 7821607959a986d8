#!/usr/bin/env node
// A small kvsched worker in Node.js: proof that kvsched.v1 is language-neutral.
//
// It opens WorkerService.Connect, sends Hello (seq 1), streams one batch of
// session events per agent session (a step that ends in a tool call), sends a
// heartbeat, answers each RetentionDirective with a DirectiveAck (it keeps a
// lease table but no KV: a real engine would hold blocks here), answers
// ResyncRequest with an (incomplete) PoolSnapshot, and prints every server
// message as one JSON line. It exits once every message it sent is acked and
// the directives have had --linger-s to arrive.
//
// usage: node worker.js --target 127.0.0.1:50051 --worker-id node-0 [--sessions 2]
//        [--epoch 1] [--linger-s 1] [--proto-dir ../../proto] [--token kvs_...]
'use strict';

const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const args = {
    target: '127.0.0.1:50051',
    workerId: 'node-0',
    epoch: 1,
    sessions: 2,
    lingerS: 1.0,
    protoDir: path.resolve(__dirname, '..', '..', 'proto'),
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [key, value] = [argv[i], argv[i + 1]];
    if (key === '--target') args.target = value;
    else if (key === '--worker-id') args.workerId = value;
    else if (key === '--epoch') args.epoch = Number(value);
    else if (key === '--sessions') args.sessions = Number(value);
    else if (key === '--linger-s') args.lingerS = Number(value);
    else if (key === '--proto-dir') args.protoDir = path.resolve(value);
    else if (key === '--token') args.token = value;
    else throw new Error(`unknown argument ${key}`);
  }
  return args;
}

function loadWorkerService(protoDir) {
  // longs as strings: uint64 seqs and block counts never lose precision in JS.
  const def = protoLoader.loadSync('kvsched/v1/worker.proto', {
    includeDirs: [protoDir],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(def).kvsched.v1.WorkerService;
}

function print(kind, body) {
  process.stdout.write(JSON.stringify({ kind, ...body }) + '\n');
}

function sessionEvents(sessionIndex) {
  const sessionId = `node-s${sessionIndex}`;
  const base = {
    session_id: sessionId,
    tenant_id: 'node-tenant',
    agent_type: 'node-agent',
    step_index: 0,
    event_time_s: Date.now() / 1000,
  };
  const event = (kind, extra) => ({ event_id: crypto.randomUUID(), ...base, kind, ...extra });
  return [
    event('STEP_START', { context_tokens: 1200, new_tokens: 1200 }),
    event('STEP_END', { context_tokens: 1260, new_tokens: 60 }),
    event('TOOL_CALL_WAIT', { context_tokens: 1260, tool_name: 'pytest' }),
  ];
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const WorkerService = loadWorkerService(args.protoDir);
  const client = new WorkerService(args.target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set('authorization', `Bearer ${args.token}`);
  const call = client.Connect(metadata);
  let seq = 1;
  let highestAcked = 0;
  let leaderEpoch = 0;
  const leases = new Map(); // session id -> lease expiry (ms since epoch)
  const summary = { acked_seq: 0, sent_seq: 0, server_batches: 0, directives: [], welcome: null };

  const send = (body) => {
    const msg = { seq: String(seq), ...body };
    seq += 1;
    call.write(msg);
    summary.sent_seq = seq - 1;
    return seq - 1;
  };

  // Apply one directive to the (toy) lease table; returns the answer to send.
  const answer = (d) => {
    print('directive', d);
    let outcome = 'DIRECTIVE_APPLIED';
    let reason = '';
    if (Number(d.leader_epoch) < leaderEpoch) {
      outcome = 'DIRECTIVE_STALE_EPOCH';
      reason = `leader epoch ${d.leader_epoch} < ${leaderEpoch}`;
    } else if (d.action === 'RETAIN_GPU') {
      leases.set(d.session_id, Date.now() + d.lease_ttl_s * 1000);
    } else {
      leases.delete(d.session_id);
    }
    summary.directives.push({ session_id: d.session_id, action: d.action, outcome });
    return { directive_id: d.directive_id, outcome, reason };
  };
  const acked = (ackSeq) => {
    highestAcked = Math.max(highestAcked, Number(ackSeq));
    finishIfDone();
  };

  call.write({
    seq: '1',
    hello: {
      worker_id: args.workerId,
      epoch: String(args.epoch),
      endpoint: '127.0.0.1:18000',
      engine_name: 'node-reference',
      engine_version: process.version,
      model: 'demo',
      cache_spec: {
        block_size_tokens: 16,
        bytes_per_token: '131072',
        gpu_capacity_blocks: '4096',
        host_capacity_blocks: '0',
        hash_algo: 'sha256',
        prefill_tokens_per_s: 10000,
      },
      resume_from_seq: '0',
      accepts_server_batch: true,
    },
  });
  seq = 2;

  let lastSent = 0;
  let lingerTimer = null;
  const finishIfDone = () => {
    if (highestAcked >= lastSent && lastSent > 0 && lingerTimer === null) {
      lingerTimer = setTimeout(() => {
        summary.acked_seq = highestAcked;
        print('summary', summary);
        call.end();
        client.close();
      }, args.lingerS * 1000);
    }
  };

  call.on('data', (msg) => {
    switch (msg.body) {
      case 'welcome': {
        leaderEpoch = Number(msg.welcome.leader_epoch);
        summary.welcome = msg.welcome;
        print('welcome', msg.welcome);
        const events = [];
        for (let i = 0; i < args.sessions; i += 1) events.push(...sessionEvents(i));
        send({ session_events: { events } });
        lastSent = send({ heartbeat: { gpu_free_blocks: '4096', running_steps: 0 } });
        break;
      }
      case 'ack':
        print('ack', msg.ack);
        acked(msg.ack.seq);
        break;
      case 'directive':
        lastSent = send({ directive_ack: answer(msg.directive) });
        break;
      case 'batch': {
        // directives in order, then the ack; all answers go back in one WorkerBatch
        summary.server_batches += 1;
        const answers = msg.batch.directives.map(answer);
        if (answers.length > 0) lastSent = send({ batch: { directive_acks: answers } });
        if (Number(msg.batch.ack_seq) > 0) acked(msg.batch.ack_seq);
        break;
      }
      case 'resync':
        lastSent = send({ pool_snapshot: { complete: false, sessions: [] } });
        break;
      case 'drain':
        print('drain', msg.drain);
        break;
      default:
        print('unknown', { body: msg.body });
    }
  });
  call.on('error', (err) => {
    print('error', { code: err.code, details: err.details });
    process.exitCode = 1;
  });
  call.on('end', () => {
    if (lingerTimer === null) process.exitCode = 1;
  });
}

main();
