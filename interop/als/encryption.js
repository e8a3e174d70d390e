// Envelope encryption as aws-lambda-stream does it (encryptEvent and decryptEvent, aws-kms-ee
// underneath), against the AWS KMS that AWS_ENDPOINT_URL_KMS names.
//
// Input on stdin: {"encrypt": {"event", "fields", "masterKeyAlias"}} or {"decrypt": {"event"}}.
// Output on stdout: the event, encrypted (with its `eem`) or decrypted (without).
process.env.AWS_REGION = process.env.AWS_REGION || 'us-west-2';
const _ = require('highland');
const als = require('aws-lambda-stream');

const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const step = input.encrypt
  ? als.encryptEvent({
    eem: { fields: input.encrypt.fields },
    masterKeyAlias: input.encrypt.masterKeyAlias,
  })
  : als.decryptEvent({ prefilter: () => true });
const event = (input.encrypt || input.decrypt).event;
_([{ event }])
  .through(step)
  .collect()
  .toCallback((err, uows) => {
    if (err) {
      console.error(err);
      process.exit(1);
    }
    process.stdout.write(JSON.stringify(uows[0].event));
  });
