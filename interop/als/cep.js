// Control services as aws-lambda-stream runs them, against a DynamoDB table (moto in the
// tests, through AWS_ENDPOINT_URL_DYNAMODB): its collect, correlate and evaluate flavors, with
// rules shaped as its documentation shapes them, so Floodway's correlation-store items are
// checked against the library's own readers and writers.
//
// Input on stdin:
//   {"step": "collect", "table": T, "events": [...]}     the events, as a Kinesis invocation
//   {"step": "correlate", "table": T, "records": [...]}  DynamoDB stream records (Lambda's shape)
//   {"step": "evaluate", "table": T, "records": [...]}   the same
// Output on stdout: {"emitted": [...], "faults": [...]}: what its publisher received.
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
process.env.AWS_REGION = process.env.AWS_REGION || 'us-west-2';
process.env.EVENT_TABLE_NAME = input.table;
const als = require('aws-lambda-stream');

const TYPES = ['order-submitted', 'payment-captured'];

const RULES = {
  // Collected under the partition key (the flavor's default), kept a day.
  collect: [{ id: 'orders-collect', flavor: als.collect, eventType: TYPES, ttl: 1 }],
  // The collected events correlated under the partition key.
  correlate: [{
    id: 'orders-correlate', flavor: als.correlate, eventType: TYPES, correlationKey: 'partitionKey',
  }],
  // An order is ready once its set holds an order and its payment; the triggers are the set.
  evaluate: [{
    id: 'ready',
    flavor: als.evaluate,
    eventType: TYPES,
    expression: (uow) => {
      const types = new Set(uow.correlated.map((e) => e.type));
      return TYPES.every((t) => types.has(t)) ? uow.correlated : false;
    },
    emit: 'order-ready',
  }],
};

const emitted = [];
const faults = [];
const publish = (opt) => (s) => s.tap((uow) => {
  const event = uow[opt.eventField || 'event'];
  (event && event.type === 'fault' ? faults : emitted).push(event);
});
const opt = { ...als.defaultOptions, publish };

const from = input.step === 'collect'
  ? als.fromKinesis(als.toKinesisRecords(input.events))
  : als.fromDynamodb({ Records: input.records });

als.initialize(als.initializeFrom(RULES[input.step]), opt)
  .assemble(from)
  .collect()
  .toCallback((err) => {
    if (err) {
      console.error(err);
      process.exit(1);
    }
    process.stdout.write(JSON.stringify({ emitted, faults }));
  });
