// A refold projection plugin: entity type `{{entity}}`.
//
//   {{entity}}.added  {"n": int}  total += n, count += 1
//   {{entity}}.reset  anything    total = 0,  count += 1
//   any other type    anything    nothing
//
// A negative `n`, or one that is not an integer, is a plugin error: the host
// quarantines that entity at its state before the event.
import { definePlugin, PluginError, upsert } from './refold-sdk/index.js';

export const { describe, init, fold, project } = definePlugin({
  describe: {
    name: '{{name}}',
    version: '0.1.0',
    entityType: '{{entity}}',
    eventTypes: ['{{entity}}.added', '{{entity}}.reset'],
    stateSchemaVersion: 1,
  },
  init: (_entityId) => ({ total: 0, count: 0 }),
  apply(state, event) {
    switch (event.type) {
      case '{{entity}}.added': {
        const { n } = event.fields({ n: 'i64' });
        if (n < 0) throw new PluginError(`cannot add ${n}: must not be negative`);
        return { total: state.total + n, count: state.count + 1 };
      }
      case '{{entity}}.reset':
        return { total: 0, count: state.count + 1 };
      default:
        return state; // unknown event types leave the state unchanged
    }
  },
  project: (entityId, _before, after, _events) => [upsert('totals', entityId, { total: after.total })],
});
