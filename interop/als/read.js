// The events aws-lambda-stream reads out of a Lambda invocation.
//
// Input on stdin: {"source": "kinesis" | "sqs" | "eventbridge" | "dynamodb", "invocation": ...}.
// Output on stdout: the events, as a JSON array.
process.env.AWS_REGION = process.env.AWS_REGION || 'us-west-2';
const als = require('aws-lambda-stream');

const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const from = {
  kinesis: als.fromKinesis,
  sqs: als.fromSqsEvent,
  eventbridge: als.fromEventBridge,
  dynamodb: als.fromDynamodb,
}[input.source];
from(input.invocation)
  .collect()
  .toCallback((err, uows) => {
    if (err) {
      console.error(err);
      process.exit(1);
    }
    process.stdout.write(JSON.stringify(uows.map((uow) => uow.event)));
  });
