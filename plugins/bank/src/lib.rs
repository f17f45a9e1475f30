//! Example plugin: bank accounts. Entity type `account`, amounts in integer
//! cents.
//!
//! | event type          | data                | effect                                   |
//! |---------------------|---------------------|------------------------------------------|
//! | `account.opened`    | `{"owner": string}` | `owner` set, `open = true`               |
//! | `account.deposited` | `{"amount": int}`   | `balance += amount`, `transactions += 1` |
//! | `account.withdrawn` | `{"amount": int}`   | `balance -= amount`, `transactions += 1` |
//! | `account.closed`    | anything            | `open = false`                           |
//! | any other type      | anything            | nothing                                  |
//!
//! Data that does not fit its event's schema (a missing `owner`, an `amount`
//! that is a string or has a fraction) is a plugin error, and so is a balance
//! that would overflow an `i64`.
//!
//! State (schema version 1), initially
//! `{"owner":null,"balance":0,"transactions":0,"open":false}`.
//! With the cargo feature `v2` the plugin is version 2.0.0 and the state
//! (schema version 2) gains `"tier": "standard" | "gold"`: gold while
//! `balance >= 100000`, recomputed after every event. A v1 state decodes as
//! tier standard until its next event.
//!
//! Projection `balances`, one document per owner, key = owner:
//! `{"owner","account","balance","open"}` (v2 adds `"tier"`), upserted after
//! every batch of an account that has an owner. When an account's owner
//! changes (a second `account.opened`), the old owner's document is deleted.
//! Two accounts with the same owner share one document: the last batch wins.

use refold_sdk::{Descriptor, Error, Event, Plugin, ProjectionOp};
use serde::{Deserialize, Serialize};

/// A balance at or above this many cents makes a gold account (v2).
#[cfg(feature = "v2")]
pub const GOLD_FROM: i64 = 100_000;

/// The state of one account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Set by `account.opened`.
    pub owner: Option<String>,
    /// In cents.
    pub balance: i64,
    /// Deposits and withdrawals applied.
    pub transactions: u64,
    /// Between `account.opened` and `account.closed`.
    pub open: bool,
    /// Derived from `balance` (v2 only).
    #[cfg(feature = "v2")]
    #[serde(default)]
    pub tier: Tier,
}

/// Account tier (v2).
#[cfg(feature = "v2")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Below [`GOLD_FROM`].
    #[default]
    Standard,
    /// At or above [`GOLD_FROM`].
    Gold,
}

#[derive(Deserialize)]
struct Opened {
    owner: String,
}

#[derive(Deserialize)]
struct Amount {
    amount: i64,
}

/// The plugin.
#[derive(Debug)]
pub struct Bank;

impl Plugin for Bank {
    type State = Account;

    fn describe() -> Descriptor {
        Descriptor {
            name: "bank".into(),
            version: if cfg!(feature = "v2") {
                "2.0.0"
            } else {
                "1.0.0"
            }
            .into(),
            entity_type: "account".into(),
            event_types: [
                "account.opened",
                "account.deposited",
                "account.withdrawn",
                "account.closed",
            ]
            .map(String::from)
            .to_vec(),
            state_schema_version: if cfg!(feature = "v2") { 2 } else { 1 },
        }
    }

    fn init(_entity_id: &str) -> Account {
        Account {
            owner: None,
            balance: 0,
            transactions: 0,
            open: false,
            #[cfg(feature = "v2")]
            tier: Tier::Standard,
        }
    }

    fn apply(state: &mut Account, event: &Event) -> Result<(), Error> {
        match event.event_type.as_str() {
            "account.opened" => {
                let Opened { owner } = event.data()?;
                state.owner = Some(owner);
                state.open = true;
            }
            "account.deposited" => {
                let Amount { amount } = event.data()?;
                state.balance = state.balance.checked_add(amount).ok_or_else(|| {
                    Error::new(format!("deposit of {amount} overflows the balance"))
                })?;
                state.transactions += 1;
            }
            "account.withdrawn" => {
                let Amount { amount } = event.data()?;
                state.balance = state.balance.checked_sub(amount).ok_or_else(|| {
                    Error::new(format!("withdrawal of {amount} overflows the balance"))
                })?;
                state.transactions += 1;
            }
            "account.closed" => state.open = false,
            _ => {}
        }
        #[cfg(feature = "v2")]
        {
            state.tier = if state.balance >= GOLD_FROM {
                Tier::Gold
            } else {
                Tier::Standard
            };
        }
        Ok(())
    }

    fn project(
        entity_id: &str,
        before: &Account,
        after: &Account,
        _events: &[Event],
    ) -> Vec<ProjectionOp> {
        let mut ops = Vec::new();
        if let Some(old) = &before.owner
            && after.owner.as_ref() != Some(old)
        {
            ops.push(ProjectionOp::delete("balances", old.as_str()));
        }
        if let Some(owner) = &after.owner {
            ops.push(ProjectionOp::upsert(
                "balances",
                owner.as_str(),
                &BalanceDoc {
                    owner,
                    account: entity_id,
                    balance: after.balance,
                    open: after.open,
                    #[cfg(feature = "v2")]
                    tier: after.tier,
                },
            ));
        }
        ops
    }
}

/// A document of the `balances` projection.
#[derive(Serialize)]
struct BalanceDoc<'a> {
    owner: &'a str,
    account: &'a str,
    balance: i64,
    open: bool,
    #[cfg(feature = "v2")]
    tier: Tier,
}

refold_sdk::export!(Bank);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fold(events: &[Event]) -> Result<Account, Error> {
        let mut state = Bank::init("acc-1");
        for e in events {
            Bank::apply(&mut state, e)?;
        }
        Ok(state)
    }

    fn ev(ty: &str, data: serde_json::Value) -> Event {
        Event::new("e", ty, data)
    }

    #[test]
    fn initial_state_has_the_documented_shape() {
        let expected = if cfg!(feature = "v2") {
            json!({"owner": null, "balance": 0, "transactions": 0, "open": false, "tier": "standard"})
        } else {
            json!({"owner": null, "balance": 0, "transactions": 0, "open": false})
        };
        assert_eq!(serde_json::to_value(Bank::init("x")).unwrap(), expected);
    }

    #[test]
    fn folds_the_happy_path() {
        let s = fold(&[
            ev("account.opened", json!({"owner": "ada"})),
            ev("account.deposited", json!({"amount": 1500})),
            ev("account.withdrawn", json!({"amount": 200})),
            ev("account.renamed", json!({"whatever": true})),
            ev("account.closed", json!(null)),
        ])
        .unwrap();
        assert_eq!(
            (s.owner.as_deref(), s.balance, s.transactions, s.open),
            (Some("ada"), 1300, 2, false)
        );
    }

    #[test]
    fn rejects_data_that_does_not_fit() {
        for data in [
            json!({"amount": "12.50"}),
            json!({"amount": 12.5}),
            json!({}),
        ] {
            let err = fold(&[ev("account.deposited", data)]).unwrap_err();
            assert!(
                err.message()
                    .starts_with("data of account.deposited does not fit its schema: "),
                "{err}"
            );
        }
        assert!(fold(&[ev("account.opened", json!({"name": "ada"}))]).is_err());
        assert!(
            fold(&[
                ev("account.deposited", json!({"amount": i64::MAX})),
                ev("account.deposited", json!({"amount": 1}))
            ])
            .is_err()
        );
    }

    #[test]
    fn projects_balances_by_owner() {
        let before = Bank::init("acc-1");
        let after = fold(&[
            ev("account.opened", json!({"owner": "ada"})),
            ev("account.deposited", json!({"amount": 5})),
        ])
        .unwrap();
        let ops = Bank::project("acc-1", &before, &after, &[]);
        let ProjectionOp::Upsert {
            projection,
            key,
            body,
        } = &ops[0]
        else {
            panic!("{ops:?}")
        };
        assert_eq!(
            (projection.as_str(), key.as_str(), ops.len()),
            ("balances", "ada", 1)
        );
        assert_eq!(
            (&body["account"], &body["balance"], &body["open"]),
            (&json!("acc-1"), &json!(5), &json!(true))
        );

        let mut renamed = after.clone();
        Bank::apply(&mut renamed, &ev("account.opened", json!({"owner": "bob"}))).unwrap();
        let ops = Bank::project("acc-1", &after, &renamed, &[]);
        assert_eq!(ops[0], ProjectionOp::delete("balances", "ada"));
        assert!(matches!(&ops[1], ProjectionOp::Upsert { key, .. } if key == "bob"));
        assert!(Bank::project("acc-1", &before, &before, &[]).is_empty());
    }

    #[cfg(feature = "v2")]
    #[test]
    fn v2_tier_follows_the_balance_and_v1_states_decode() {
        let v1: Account = serde_json::from_value(
            json!({"owner": "ada", "balance": 150000, "transactions": 1, "open": true}),
        )
        .unwrap();
        assert_eq!(v1.tier, Tier::Standard);
        let mut s = v1;
        Bank::apply(&mut s, &ev("account.deposited", json!({"amount": 0}))).unwrap();
        assert_eq!(s.tier, Tier::Gold);
        Bank::apply(&mut s, &ev("account.withdrawn", json!({"amount": 50001}))).unwrap();
        assert_eq!(s.tier, Tier::Standard);
        assert_eq!(serde_json::to_value(&s).unwrap()["tier"], json!("standard"));
    }
}
