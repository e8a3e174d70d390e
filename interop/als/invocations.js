// What aws-lambda-stream makes of a set of events: the Lambda invocations its test helpers
// build (toKinesisRecords, toSqsEventRecords, toDynamodbRecords, toEventBridgeRecord,
// toSnsRecords), and the events its from* functions read out of them.
//
// Input on stdin: {"events": [...], "rows": [...toDynamodbRecords input...]}.
// Output on stdout: {"<source>": {"invocation": ..., "events": [...]}, ...}.
process.env.AWS_REGION = process.env.AWS_REGION || 'us-west-2';
const als = require('aws-lambda-stream');

const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const read = (stream) => new Promise((resolve, reject) => stream
  .collect()
  .toCallback((err, uows) => (err ? reject(err) : resolve(uows.map((uow) => uow.event)))));

(async () => {
  const kinesis = als.toKinesisRecords(input.events);
  const sqs = als.toSqsEventRecords(input.events);
  const dynamodb = als.toDynamodbRecords(input.rows);
  const sns = als.toSnsRecords(input.events.map((e) => ({ msg: JSON.stringify(e) })));
  const eventbridge = [];
  // And as another producer puts them on the bus: the id only on the envelope.
  const eventbridgeWithoutId = [];
  for (const e of input.events) {
    const invocation = als.toEventBridgeRecord(e);
    eventbridge.push({ invocation, events: await read(als.fromEventBridge(invocation)) });
    const { id, ...detail } = e;
    const bare = { ...als.toEventBridgeRecord(detail), id: `eb-${id}` };
    eventbridgeWithoutId.push({ invocation: bare, events: await read(als.fromEventBridge(bare)) });
  }
  const out = {
    kinesis: { invocation: kinesis, events: await read(als.fromKinesis(kinesis)) },
    sqs: { invocation: sqs, events: await read(als.fromSqsEvent(sqs)) },
    dynamodb: { invocation: dynamodb, events: await read(als.fromDynamodb(dynamodb)) },
    sns: { invocation: sns },
    eventbridge,
    eventbridge_without_id: eventbridgeWithoutId,
  };
  process.stdout.write(JSON.stringify(out));
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
