// The Node side of the side-by-side benchmark: a Kinesis listener written with
// aws-lambda-stream, timed over Lambda Kinesis invocations.
//
// Usage: NODE_PATH=target/als/node_modules node interop/als/bench.js [--runs N] f1.json f2.json ...
// Each file is one Lambda Kinesis invocation ({"Records": [...]}, base64 event JSON in
// `kinesis.data`).
//
// The handler is the one the library's README describes:
//   initialize(PIPELINES, OPTIONS).assemble(fromKinesis(event)).through(toPromise)
// with two pipelines:
//   accepted: order-submitted -> emits order-accepted, batches of 10, counting sink
//   paid:     order-paid      -> emits order-confirmed, batches of 25, counting sink
// The counting sink is shaped like the library's own sinks (sendToSqs, publishToEventBridge):
// batch, toBatchUow, one promise per batch wrapped in a stream, parallel, flatMap(unBatchUow);
// its promise counts the batch instead of calling AWS.
//
// Poison events (order-submitted / order-paid without `order`) throw while mapped; `faulty`
// adorns the error with its uow, and the fault handler that `assemble` installs (`faults`)
// buffers a fault event, which `flushFaults` hands at the end of the invocation to
// `opt.publish`. That publisher is an option of the library (defaultOptions.publish is
// publishToEventBridge); here OPTIONS.publish is the same counting sink, so faults are counted
// in-process and nothing goes over the network.
//
// Measured, per file: JSON.parse of the invocation (already read into a Buffer) plus the
// handler until its promise resolves, i.e. what a Node Lambda does with one invocation. One
// run is the sum over the files. A first warm-up run (not counted) precedes `--runs` timed
// runs (default 3).
//
// Output on stdout, one JSON object:
//   {"records", "runs_s", "records_per_s" (median), "counted": {"accepted", "paid"}, "faults",
//    "peak_rss_mib", "node", "als"}
// where records, counted and faults are per run (they must be equal in every run).
process.env.AWS_REGION = process.env.AWS_REGION || 'us-west-2';
process.env.AWS_LAMBDA_FUNCTION_NAME = process.env.AWS_LAMBDA_FUNCTION_NAME || 'bench-listener';
delete process.env.DEBUG; // the library's debug logs stay off

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const _ = require('highland');
const {
  initialize,
  defaultOptions,
  fromKinesis,
  toPromise,
  faulty,
  filterOnEventType,
  toBatchUow,
  unBatchUow,
} = require('aws-lambda-stream');

// What the sinks counted in the current run.
const counted = { accepted: 0, paid: 0, faults: 0 };

// A sink shaped like the library's sinks, whose "request" counts the batch's uows into
// counted[key].
const countingSink = (key) => ({
  batchSize = 10,
  parallel = Number(process.env.PARALLEL) || 8,
} = {}) => (s) => s
  .batch(batchSize)
  .map(toBatchUow)
  .map((batchUow) => _(Promise.resolve(batchUow).then((b) => {
    counted[key] += b.batch.length;
    return b;
  })))
  .parallel(parallel)
  .flatMap(unBatchUow);

// As the library's flavors filter: faulty, so a filter that throws raises a fault.
const onEventType = (eventType) => faulty((uow) => filterOnEventType({ eventType }, uow));

// A stable id for the emitted event: sha256 of `<input id>|<emitted type>`, 32 hex chars.
const emittedId = (id, type) => crypto.createHash('sha256').update(`${id}|${type}`).digest('hex').slice(0, 32);

// Maps a uow to one carrying the emitted event in `emit`; reading `event.order.id` throws on a
// poison event, and `faulty` turns that into a fault.
const toEmit = (type) => faulty((uow) => ({
  ...uow,
  emit: {
    id: emittedId(uow.event.id, type),
    type,
    timestamp: uow.event.timestamp,
    partitionKey: uow.event.partitionKey,
    order: {
      id: uow.event.order.id,
      customerId: uow.event.order.customerId,
      total: uow.event.order.total,
    },
  },
}));

// The pipelines: curried, options first (initialize), then the forked stream (assemble).
const accepted = (opt) => (s) => s
  .filter(onEventType('order-submitted'))
  .map(toEmit('order-accepted'))
  .through(countingSink('accepted')({ ...opt, batchSize: 10 }));

const paid = (opt) => (s) => s
  .filter(onEventType('order-paid'))
  .map(toEmit('order-confirmed'))
  .through(countingSink('paid')({ ...opt, batchSize: 25 }));

const PIPELINES = { accepted, paid };

// Faults go to this publisher instead of EventBridge.
const OPTIONS = { ...defaultOptions, publish: countingSink('faults') };

const handle = async (event) => initialize(PIPELINES, OPTIONS)
  .assemble(fromKinesis(event))
  .through(toPromise);

// One run: every file, parsed and handled in turn; the seconds it took.
const run = async (buffers) => {
  let ns = 0n;
  for (const buf of buffers) {
    const start = process.hrtime.bigint();
    const event = JSON.parse(buf.toString());
    await handle(event);
    ns += process.hrtime.bigint() - start;
  }
  return Number(ns) / 1e9;
};

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

const parseArgs = (argv) => {
  let runs = 3;
  const files = [];
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--runs') {
      runs = Number(argv[i += 1]);
    } else {
      files.push(argv[i]);
    }
  }
  if (!(Number.isInteger(runs) && runs > 0) || files.length === 0) {
    throw new Error('usage: bench.js [--runs N] invocation.json ...');
  }
  return { runs, files };
};

(async () => {
  const { runs, files } = parseArgs(process.argv.slice(2));
  const buffers = files.map((f) => fs.readFileSync(f));
  const records = buffers.reduce((n, buf) => n + JSON.parse(buf.toString()).Records.length, 0);

  const runsS = [];
  let first;
  for (let i = 0; i <= runs; i += 1) {
    counted.accepted = 0;
    counted.paid = 0;
    counted.faults = 0;
    const s = await run(buffers); // eslint-disable-line no-await-in-loop
    const got = JSON.stringify(counted);
    if (first === undefined) {
      first = got;
    } else if (got !== first) {
      throw new Error(`runs disagree: ${first} vs ${got}`);
    }
    if (i > 0) runsS.push(s); // run 0 is the warm-up
    console.error(`run ${i}${i === 0 ? ' (warm-up)' : ''}: ${s.toFixed(3)} s ${got}`);
  }

  const alsDir = path.dirname(path.dirname(require.resolve('aws-lambda-stream')));
  const alsVersion = JSON.parse(fs.readFileSync(path.join(alsDir, 'package.json'), 'utf8')).version;
  process.stdout.write(`${JSON.stringify({
    records,
    runs_s: runsS,
    records_per_s: median(runsS.map((s) => records / s)),
    counted: { accepted: counted.accepted, paid: counted.paid },
    faults: counted.faults,
    peak_rss_mib: process.resourceUsage().maxRSS / 1024,
    node: process.version,
    als: alsVersion,
  })}\n`);
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
