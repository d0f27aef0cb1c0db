//! The places one hosted stage serves, and where each item goes from it.
//!
//! A stage is usually one place: stage `i` of one route. When several routes share its
//! `Runtime`, it is one queue serving each of their places (its stream binds every
//! place's work subject, see [`natserve_protocol::StageAt`]), so one batch may hold items
//! of several routes. Each item's place is read from the subject it arrived on; it says
//! where the item's result goes next and whether the item is at the first or the last
//! stage of its own route (the worker decodes and encodes it accordingly).

use natserve_protocol::agent_config::Place;
use natserve_protocol::frame::{EDGE_FIRST, EDGE_LAST};
use natserve_protocol::{route_slug, NameError, Names, StageAt};

/// One place of the stage, as the stage sends items on from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Way {
    /// The work subject items of this place arrive on.
    pub subject: String,
    pub at: StageAt,
    /// The work subject of the route's next stage; `None` at its last.
    pub next_subject: Option<String>,
    /// [`EDGE_FIRST`] and/or [`EDGE_LAST`]: where the place stands in its route.
    pub edge: u8,
}

/// Every place of one hosted stage, its home first.
#[derive(Debug, Clone)]
pub struct Places {
    ways: Vec<Way>,
    /// Whether the places stand differently in their routes (first in one, in the middle
    /// of another): only then does each item's edge travel to the worker.
    mixed: bool,
}

impl Places {
    /// `places` as [`natserve_protocol::AgentConfig::places`] lists them, home first;
    /// never empty.
    pub fn new(names: &Names, places: &[Place]) -> Result<Self, NameError> {
        assert!(!places.is_empty(), "a stage serves at least its home");
        let ways = places
            .iter()
            .map(|place| {
                let slug = route_slug(&place.at.route)?;
                let stage = place.at.stage;
                let edge = if place.is_first() { EDGE_FIRST } else { 0 }
                    | if place.is_last() { EDGE_LAST } else { 0 };
                Ok(Way {
                    subject: names.work_subject(&slug, stage),
                    at: place.at.clone(),
                    next_subject: (!place.is_last()).then(|| names.work_subject(&slug, stage + 1)),
                    edge,
                })
            })
            .collect::<Result<Vec<_>, NameError>>()?;
        let mixed = ways.iter().any(|w| w.edge != ways[0].edge);
        Ok(Self { ways, mixed })
    }

    /// The one place of an unshared stage `stage` of `route`, which has `stages_in_route`.
    pub fn single(
        names: &Names,
        route: &str,
        stage: u32,
        stages_in_route: u32,
    ) -> Result<Self, NameError> {
        let at = StageAt {
            route: route.to_owned(),
            stage,
        };
        Self::new(
            names,
            &[Place {
                at,
                stages_in_route,
            }],
        )
    }

    pub fn home(&self) -> &Way {
        &self.ways[0]
    }

    /// The place of an item that arrived on `subject`; the home for a subject the stage
    /// does not bind (which its stream would not have taken).
    pub fn of(&self, subject: &str) -> &Way {
        self.ways
            .iter()
            .find(|w| w.subject == subject)
            .unwrap_or(&self.ways[0])
    }

    /// The work subjects the stage's stream binds.
    pub fn subjects(&self) -> impl Iterator<Item = &str> {
        self.ways.iter().map(|w| w.subject.as_str())
    }

    /// Each item's edge, for items that arrived on `subjects`; empty when every place
    /// stands where the home does (the worker's own stage then says it).
    pub fn edges<'a>(&self, subjects: impl Iterator<Item = &'a str>) -> Vec<u8> {
        if !self.mixed {
            return Vec::new();
        }
        subjects.map(|s| self.of(s).edge).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(route: &str, stage: u32, stages_in_route: u32) -> Place {
        Place {
            at: StageAt {
                route: route.into(),
                stage,
            },
            stages_in_route,
        }
    }

    #[test]
    fn each_item_goes_on_along_its_own_route() {
        let names = Names::new("ns").unwrap();
        // Mosec's multi-route service: Count is stage 1 of 3 on one route, the last of
        // two on the other.
        let places = Places::new(
            &names,
            &[place("/v1/inference", 1, 3), place("/inference", 1, 2)],
        )
        .unwrap();
        let typed = places.of("ns.work.v1_inference.1");
        assert_eq!(
            typed.next_subject.as_deref(),
            Some("ns.work.v1_inference.2")
        );
        assert_eq!(typed.edge, 0);
        let raw = places.of("ns.work.inference.1");
        assert_eq!(raw.next_subject, None);
        assert_eq!(raw.edge, EDGE_LAST);
        assert_eq!(
            places.subjects().collect::<Vec<_>>(),
            ["ns.work.v1_inference.1", "ns.work.inference.1"]
        );
        let subjects = ["ns.work.inference.1", "ns.work.v1_inference.1"];
        assert_eq!(places.edges(subjects.into_iter()), [EDGE_LAST, 0]);
    }

    #[test]
    fn places_that_stand_alike_send_no_edges() {
        let names = Names::new("ns").unwrap();
        let places = Places::new(&names, &[place("/a", 0, 1), place("/b", 0, 1)]).unwrap();
        assert_eq!(places.home().edge, EDGE_FIRST | EDGE_LAST);
        assert!(places.edges(["ns.work.b.0"].into_iter()).is_empty());
        let single = Places::single(&names, "/a", 0, 2).unwrap();
        assert_eq!(single.home().next_subject.as_deref(), Some("ns.work.a.1"));
        assert_eq!(single.of("elsewhere"), single.home());
    }
}
