//! Example plugin: orders. Entity type `order`, money in integer cents.
//!
//! | event type           | data                                  | allowed while status is | effect                                   |
//! |----------------------|---------------------------------------|-------------------------|------------------------------------------|
//! | `order.created`      | `{"customer": string}`                | `new`                   | `customer` set, status `created`         |
//! | `order.item_added`   | `{"sku": string, "qty": int, "price": int}` | `created`         | line `sku` set (replacing one with the same sku); `qty >= 1`, `price >= 0` |
//! | `order.item_removed` | `{"sku": string}`                     | `created`               | line `sku` removed; it must exist        |
//! | `order.paid`         | `{"amount": int}`                     | `created`               | `total > 0` and `amount == total`; `paid = amount`, status `paid` |
//! | `order.shipped`      | anything                              | `paid`                  | status `shipped`                         |
//! | `order.cancelled`    | `{"reason"?: string}` or absent       | `created`, `paid`       | status `cancelled`, `cancel_reason` set  |
//! | any other type       | anything                              | any                     | nothing                                  |
//!
//! Every rule in the table is an invariant: an event that breaks one (an
//! `order.*` event before `order.created`, `order.created` twice, an item
//! change after payment, removing an unknown sku, `qty < 1`, paying an empty
//! order or a wrong amount, shipping an unpaid order, cancelling a shipped or
//! cancelled order), or whose data does not fit its schema, is a plugin error,
//! and the host quarantines the order before it.
//!
//! State (schema version 1), initially
//! `{"customer":null,"status":"new","items":{},"total":0,"paid":0,"cancel_reason":null}`:
//!
//! * `customer`: string, or null before `order.created`;
//! * `status`: `"new"` (no event yet), `"created"`, `"paid"`, `"shipped"`,
//!   `"cancelled"`;
//! * `items`: object from sku to `{"qty": int, "price": int}` (unit price),
//!   sorted by sku;
//! * `total`: sum of `qty * price` over the items;
//! * `paid`: the amount paid, 0 until `order.paid`;
//! * `cancel_reason`: the reason given by `order.cancelled`, else null.
//!
//! Projection `orders_by_customer`: a `project` call sees one entity, so there
//! is one document per order rather than one per customer. Key
//! `"{customer}:{order_id}"`, body
//! `{"customer","order": order_id,"status","total"}`, upserted after every
//! batch of a created order. A customer's orders are the keys with the prefix
//! `"{customer}:"`.

use std::collections::BTreeMap;
use std::fmt;

use refold_sdk::{Descriptor, Error, Event, Plugin, ProjectionOp};
use serde::{Deserialize, Serialize};

/// The state of one order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Set by `order.created`.
    pub customer: Option<String>,
    /// Where the order is in its life.
    pub status: Status,
    /// Lines by sku (sorted, so the state encodes the same way every time).
    pub items: BTreeMap<String, Item>,
    /// Sum of `qty * price` over `items`, in cents.
    pub total: i64,
    /// Amount paid, in cents.
    pub paid: i64,
    /// Reason given when cancelled.
    pub cancel_reason: Option<String>,
}

/// One order line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Quantity, at least 1.
    pub qty: i64,
    /// Unit price in cents, at least 0.
    pub price: i64,
}

/// Order status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// No event applied yet.
    New,
    /// Created; items may change.
    Created,
    /// Paid; items are frozen.
    Paid,
    /// Shipped (final).
    Shipped,
    /// Cancelled (final).
    Cancelled,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::New => "new",
            Status::Created => "created",
            Status::Paid => "paid",
            Status::Shipped => "shipped",
            Status::Cancelled => "cancelled",
        })
    }
}

#[derive(Deserialize)]
struct Created {
    customer: String,
}

#[derive(Deserialize)]
struct ItemAdded {
    sku: String,
    qty: i64,
    price: i64,
}

#[derive(Deserialize)]
struct ItemRemoved {
    sku: String,
}

#[derive(Deserialize)]
struct Paid {
    amount: i64,
}

#[derive(Deserialize)]
struct Cancelled {
    #[serde(default)]
    reason: Option<String>,
}

const EVENT_TYPES: [&str; 6] = [
    "order.created",
    "order.item_added",
    "order.item_removed",
    "order.paid",
    "order.shipped",
    "order.cancelled",
];

/// The plugin.
#[derive(Debug)]
pub struct Orders;

fn require(ok: bool, message: impl FnOnce() -> String) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(Error::new(message()))
    }
}

fn items_may_change(state: &Order, ty: &str) -> Result<(), Error> {
    require(state.status == Status::Created, || {
        format!(
            "{ty}: items can only change while the order is created, it is {}",
            state.status
        )
    })
}

fn total(items: &BTreeMap<String, Item>) -> Result<i64, Error> {
    items
        .values()
        .try_fold(0i64, |sum, item| {
            item.qty
                .checked_mul(item.price)
                .and_then(|line| sum.checked_add(line))
        })
        .ok_or_else(|| Error::new("order total overflows"))
}

impl Plugin for Orders {
    type State = Order;

    fn describe() -> Descriptor {
        Descriptor {
            name: "orders".into(),
            version: "1.0.0".into(),
            entity_type: "order".into(),
            event_types: EVENT_TYPES.map(String::from).to_vec(),
            state_schema_version: 1,
        }
    }

    fn init(_entity_id: &str) -> Order {
        Order {
            customer: None,
            status: Status::New,
            items: BTreeMap::new(),
            total: 0,
            paid: 0,
            cancel_reason: None,
        }
    }

    fn apply(state: &mut Order, event: &Event) -> Result<(), Error> {
        let ty = event.event_type.as_str();
        if !EVENT_TYPES.contains(&ty) {
            return Ok(());
        }
        if ty != "order.created" {
            require(state.status != Status::New, || {
                format!("{ty} before order.created")
            })?;
        }
        match ty {
            "order.created" => {
                require(state.status == Status::New, || {
                    "order.created twice: the order already exists".into()
                })?;
                let Created { customer } = event.data()?;
                state.customer = Some(customer);
                state.status = Status::Created;
            }
            "order.item_added" => {
                items_may_change(state, ty)?;
                let ItemAdded { sku, qty, price } = event.data()?;
                require(qty >= 1, || {
                    format!("order.item_added of {sku}: qty {qty} is less than 1")
                })?;
                require(price >= 0, || {
                    format!("order.item_added of {sku}: price {price} is negative")
                })?;
                state.items.insert(sku, Item { qty, price });
                state.total = total(&state.items)?;
            }
            "order.item_removed" => {
                items_may_change(state, ty)?;
                let ItemRemoved { sku } = event.data()?;
                require(state.items.remove(&sku).is_some(), || {
                    format!("order.item_removed of {sku}: no such item in the order")
                })?;
                state.total = total(&state.items)?;
            }
            "order.paid" => {
                require(state.status == Status::Created, || {
                    format!(
                        "order.paid: only a created order can be paid, it is {}",
                        state.status
                    )
                })?;
                let Paid { amount } = event.data()?;
                require(state.total > 0, || {
                    "order.paid: the order is empty (total 0)".into()
                })?;
                require(amount == state.total, || {
                    format!(
                        "order.paid: amount {amount} differs from the total {}",
                        state.total
                    )
                })?;
                state.paid = amount;
                state.status = Status::Paid;
            }
            "order.shipped" => {
                require(state.status == Status::Paid, || {
                    format!(
                        "order.shipped: only a paid order can ship, it is {}",
                        state.status
                    )
                })?;
                state.status = Status::Shipped;
            }
            "order.cancelled" => {
                require(
                    matches!(state.status, Status::Created | Status::Paid),
                    || {
                        format!(
                            "order.cancelled: a {} order cannot be cancelled",
                            state.status
                        )
                    },
                )?;
                let reason = event.data::<Option<Cancelled>>()?.and_then(|c| c.reason);
                state.status = Status::Cancelled;
                state.cancel_reason = reason;
            }
            _ => unreachable!("{ty} is in EVENT_TYPES"),
        }
        Ok(())
    }

    fn project(
        entity_id: &str,
        _before: &Order,
        after: &Order,
        _events: &[Event],
    ) -> Vec<ProjectionOp> {
        let Some(customer) = &after.customer else {
            return Vec::new();
        };
        vec![ProjectionOp::upsert(
            "orders_by_customer",
            format!("{customer}:{entity_id}"),
            &OrderDoc {
                customer,
                order: entity_id,
                status: after.status,
                total: after.total,
            },
        )]
    }
}

/// A document of the `orders_by_customer` projection.
#[derive(Serialize)]
struct OrderDoc<'a> {
    customer: &'a str,
    order: &'a str,
    status: Status,
    total: i64,
}

refold_sdk::export!(Orders);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn ev(ty: &str, data: Value) -> Event {
        Event::new("e", ty, data)
    }

    fn created() -> Event {
        ev("order.created", json!({"customer": "c1"}))
    }

    fn add(sku: &str, qty: i64, price: i64) -> Event {
        ev(
            "order.item_added",
            json!({"sku": sku, "qty": qty, "price": price}),
        )
    }

    fn fold(events: &[Event]) -> Result<Order, Error> {
        let mut state = Orders::init("o1");
        for e in events {
            Orders::apply(&mut state, e)?;
        }
        Ok(state)
    }

    fn fails(events: &[Event], message: &str) {
        let err = fold(events).unwrap_err();
        assert_eq!(err.message(), message);
    }

    #[test]
    fn initial_state_has_the_documented_shape() {
        assert_eq!(
            serde_json::to_value(Orders::init("o1")).unwrap(),
            json!({"customer": null, "status": "new", "items": {}, "total": 0, "paid": 0, "cancel_reason": null})
        );
    }

    #[test]
    fn folds_an_order_to_shipped() {
        let s = fold(&[
            ev("order.note", json!("unknown types are ignored, even first")),
            created(),
            add("b", 2, 250),
            add("a", 1, 1000),
            add("c", 1, 5),
            ev("order.item_removed", json!({"sku": "c"})),
            add("a", 3, 1000),
            ev("order.paid", json!({"amount": 3500})),
            ev("order.shipped", json!({})),
        ])
        .unwrap();
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({
                "customer": "c1", "status": "shipped",
                "items": {"a": {"qty": 3, "price": 1000}, "b": {"qty": 2, "price": 250}},
                "total": 3500, "paid": 3500, "cancel_reason": null
            })
        );
        assert_eq!(
            serde_json::to_string(&s.items).unwrap(),
            r#"{"a":{"qty":3,"price":1000},"b":{"qty":2,"price":250}}"#
        );
    }

    #[test]
    fn cancels_with_and_without_a_reason() {
        let s = fold(&[
            created(),
            ev("order.cancelled", json!({"reason": "changed my mind"})),
        ])
        .unwrap();
        assert_eq!(
            (s.status, s.cancel_reason.as_deref()),
            (Status::Cancelled, Some("changed my mind"))
        );
        let s = fold(&[
            created(),
            add("a", 1, 1),
            ev("order.paid", json!({"amount": 1})),
            ev("order.cancelled", Value::Null),
        ])
        .unwrap();
        assert_eq!((s.status, s.cancel_reason), (Status::Cancelled, None));
    }

    #[test]
    fn enforces_every_invariant() {
        let paid = ev("order.paid", json!({"amount": 500}));
        fails(&[add("a", 1, 1)], "order.item_added before order.created");
        fails(
            &[ev("order.shipped", json!({}))],
            "order.shipped before order.created",
        );
        fails(
            &[created(), created()],
            "order.created twice: the order already exists",
        );
        fails(
            &[created(), add("a", 1, 500), paid.clone(), add("b", 1, 1)],
            "order.item_added: items can only change while the order is created, it is paid",
        );
        fails(
            &[
                created(),
                add("a", 1, 500),
                paid.clone(),
                ev("order.item_removed", json!({"sku": "a"})),
            ],
            "order.item_removed: items can only change while the order is created, it is paid",
        );
        fails(
            &[
                created(),
                add("a", 1, 1),
                ev("order.item_removed", json!({"sku": "z"})),
            ],
            "order.item_removed of z: no such item in the order",
        );
        fails(
            &[created(), add("a", 0, 1)],
            "order.item_added of a: qty 0 is less than 1",
        );
        fails(
            &[created(), add("a", 1, -1)],
            "order.item_added of a: price -1 is negative",
        );
        fails(
            &[created(), ev("order.paid", json!({"amount": 0}))],
            "order.paid: the order is empty (total 0)",
        );
        fails(
            &[created(), add("a", 1, 400), paid.clone()],
            "order.paid: amount 500 differs from the total 400",
        );
        fails(
            &[created(), add("a", 1, 500), paid.clone(), paid.clone()],
            "order.paid: only a created order can be paid, it is paid",
        );
        fails(
            &[created(), add("a", 1, 500), ev("order.shipped", json!({}))],
            "order.shipped: only a paid order can ship, it is created",
        );
        fails(
            &[
                created(),
                add("a", 1, 500),
                paid,
                ev("order.shipped", json!({})),
                ev("order.cancelled", json!({})),
            ],
            "order.cancelled: a shipped order cannot be cancelled",
        );
        fails(
            &[
                created(),
                ev("order.cancelled", json!({})),
                ev("order.cancelled", json!({})),
            ],
            "order.cancelled: a cancelled order cannot be cancelled",
        );
        fails(&[created(), add("a", i64::MAX, 2)], "order total overflows");
    }

    #[test]
    fn rejects_data_that_does_not_fit() {
        let err = fold(&[
            created(),
            ev(
                "order.item_added",
                json!({"sku": "a", "qty": 1.5, "price": 1}),
            ),
        ])
        .unwrap_err();
        assert!(
            err.message()
                .starts_with("data of order.item_added does not fit its schema: "),
            "{err}"
        );
        assert!(fold(&[ev("order.created", json!({}))]).is_err());
        assert!(fold(&[created(), ev("order.cancelled", json!({"reason": 7}))]).is_err());
    }

    #[test]
    fn projects_one_document_per_order() {
        let before = Orders::init("o1");
        assert!(Orders::project("o1", &before, &before, &[]).is_empty());
        let after = fold(&[created(), add("a", 2, 150)]).unwrap();
        assert_eq!(
            Orders::project("o1", &before, &after, &[]),
            vec![ProjectionOp::upsert(
                "orders_by_customer",
                "c1:o1",
                &json!({"customer": "c1", "order": "o1", "status": "created", "total": 300})
            )]
        );
    }
}
