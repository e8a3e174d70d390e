// Fault events as aws-lambda-stream raises them: each input event, read from a Kinesis
// invocation (toKinesisRecords, fromKinesis), fails in pipeline `p1` with `boom <id>`; its
// faults go through `faults` and `flushFaults` to a publisher that keeps them.
//
// Input on stdin: {"events": [...]}. Output on stdout: {"invocation": ..., "faults": [...]}.
process.env.AWS_REGION = process.env.AWS_REGION || 'us-west-2';
process.env.AWS_LAMBDA_FUNCTION_NAME = process.env.AWS_LAMBDA_FUNCTION_NAME || 'svc-a-dev-listener';
const als = require('aws-lambda-stream');

const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const invocation = als.toKinesisRecords(input.events);
const published = [];
const publish = () => (stream) => stream.tap((uow) => published.push(uow.event));
const opt = { publish, maxRequestSize: 256 * 1024 };
const handle = als.faults.length === 2 ? als.faults : als.faults(opt);
als.fromKinesis(invocation)
  .map((uow) => ({ pipeline: 'p1', ...uow }))
  .map(als.faulty((uow) => {
    throw new Error(`boom ${uow.event.id}`);
  }))
  .errors(handle)
  .through(als.flushFaults(opt))
  .collect()
  .toCallback((err) => {
    if (err) {
      console.error(err);
      process.exit(1);
    }
    process.stdout.write(JSON.stringify({ invocation, faults: published }));
  });
